"""Data: tasks (``tasks.load_task``), label conditions and ``PromptBatch`` (``prompts``), patching pairs
(``pairs``), derived renderings (``batches``), the organisms' language and the fetch cache.

Nothing here imports a model, ``transformer_lens`` or ``mechicl.analysis`` (``tests/test_architecture.py`` checks it).
"""
