"""The Elasticsearch backend, one concern per module:

* :mod:`~delf_es.index.es.transport`: the only place a client is built (from Settings), the only
  HTTP status -> typed error map, the documented retry policy;
* :mod:`~delf_es.index.es.templates`: index templates (``mappings/``), versioned index names, aliases;
* :mod:`~delf_es.index.es.codec`: document ids, vector encodings, packed arrays;
* :mod:`~delf_es.index.es.writes`: the two-slot, generation-checked commit, the sweep, deletes;
* :mod:`~delf_es.index.es.queries`: keypoint and global kNN with named results;
* :mod:`~delf_es.index.es.failures`: the ``<alias>-failures`` index the workers write;
* :mod:`~delf_es.index.es.backend`: :class:`ElasticsearchBackend`, composing the above.
"""

from delf_es.index.es.backend import ElasticsearchBackend
from delf_es.index.es.codec import document_id, keypoint_id
from delf_es.index.es.templates import KEYPOINTS_SUFFIX, MAPPINGS_DIR, SCHEMA, index_names, render_template
from delf_es.index.es.transport import Transport, connect

__all__ = ["ElasticsearchBackend", "KEYPOINTS_SUFFIX", "MAPPINGS_DIR", "SCHEMA", "Transport", "connect",
           "document_id", "index_names", "keypoint_id", "render_template"]
