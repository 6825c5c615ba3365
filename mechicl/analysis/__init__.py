"""Analyses: functions and classes that take a model (a TransformerBridge) and PromptBatches or pairs,
and return values (frozen dataclasses, tidy DataFrames). They never write files or draw.

All hooking goes through ``hooks`` (TL hook names, ``capture``, ``run_to_final``); the few raw-torch
tricks are in ``surgery``.
"""
