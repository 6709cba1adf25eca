"""Queue and task names the application, the tasks and the submitter agree on (no module of
the fleet imports another just for a name)."""

EXTRACT_QUEUE = "extract"
INDEX_QUEUE = "index"

EXTRACT = "delf.extract"
EXTRACT_BATCH = "delf.extract_batch"
FLUSH = "delf.flush"
REINDEX_TICK = "delf.reindex_tick"

#: task -> queue: extraction (decode + features) apart from the single-writer bulk writes
TASK_ROUTES = {
    EXTRACT: {"queue": EXTRACT_QUEUE},
    EXTRACT_BATCH: {"queue": EXTRACT_QUEUE},
    FLUSH: {"queue": INDEX_QUEUE},
    REINDEX_TICK: {"queue": INDEX_QUEUE},
}
