"""The Celery worker fleet: extraction on the ``extract`` queue, bulk writes on the ``index`` queue.

    celery -A delf_es.workers.main worker -Q extract,index -c 2     # or: delf-es worker
    delf-es enqueue photos/                                          # submit, follow completion

Modules (imports point one way: app -> tasks -> reindex -> submit -> store; nothing imports app
except the entry points):

* ``app``: :func:`~delf_es.workers.app.make_app` builds the application from the one Settings
  object and registers the tasks on it; ``WorkerContext`` holds a process's lazily built parts;
* ``main``: the ``celery -A delf_es.workers.main`` entry point (Settings from ``DELF_ES_*``);
* ``routes``: queue and task names;
* ``tasks``: the task bodies (extract, extract_batch, flush, reindex_tick);
* ``store``: the Redis state they share (staging, jobs, locks, deferred failure records);
* ``submit``: the submitting side (:class:`~delf_es.workers.submit.Submitter`, given the app);
* ``reindex``: the zero-downtime rebuild of an index for a new model or PCA;
* ``kibana``: the Kibana saved objects of the operations dashboard.
"""
