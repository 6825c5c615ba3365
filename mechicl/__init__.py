"""mechicl: a mechanistic-interpretability workbench for in-context learning.

Data flows one way: task -> PromptBatch (tokens + every position) -> hooked run
-> tidy results -> plots and report.
"""

__version__ = "0.1.0"
