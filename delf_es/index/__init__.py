"""Index backends: Elasticsearch (server) and embedded (in-process, on disk)."""
