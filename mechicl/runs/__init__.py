"""Runs: one module per command. Each builds the PromptBatches an analysis needs, runs the analyses,
and writes a run folder (CSV tables, plots via ``mechicl.viz``, ``summary.md``, ``config.json``)
through ``runs.folder``.
"""
