"""delf-es: instance-level image search with DELF/DELG features."""

from delf_es.errors import DelfEsError, InvalidImage
from delf_es.settings import Settings
from delf_es.types import Correspondences, Features, SearchHit

__all__ = ["Correspondences", "DelfEsError", "Features", "InvalidImage", "SearchHit", "Settings"]
__version__ = "0.1.0"
