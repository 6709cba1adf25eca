"""Backend contract suite.  A package so its conftest is imported as ``index.conftest`` and does not
shadow ``tests/conftest.py``, which other test modules import as ``conftest``."""
