"""The Celery worker fleet: extraction on the ``extract`` queue, bulk writes on the ``index`` queue.

    celery -A workers.main worker -Q extract,index -c 2       # or: delf-es worker
    delf-es enqueue photos/                                      # submit, follow completion

``workers.celery_app.make_app(settings)`` builds the application from the one Settings object
(``workers.main`` builds it from the environment, ``DELF_ES_*``); ``workers.tasks`` holds the
tasks, ``workers.store`` the Redis state they share, ``workers.client`` the submitting side and
``workers.reindex`` the zero-downtime rebuild of an index for a new model or PCA.
"""
