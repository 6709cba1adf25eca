"""``delf-es worker | enqueue | failures | reindex | kibana-import``: the operations commands
(registered on the main typer app by :func:`register`); settings come from the typer context."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from delf_es.cli.context import checked_of, cli_context, console, expand_inputs, fail, progress
from delf_es.errors import DelfEsError


def worker(
    ctx: typer.Context,
    queues: str = typer.Option("extract,index", help="queues to consume: extract (decode + features), index (bulk writes)"),
    concurrency: int = typer.Option(0, help="worker processes (0 = one per CPU core)"),
    pool: str = typer.Option("prefork", help="prefork (default) or solo (one task at a time, in-process)"),
    beat: bool = typer.Option(False, "--beat", help="also run the beat schedule (straggler flush, nightly reindex check)"),
    loglevel: str = typer.Option("info"),
) -> None:
    """Start a Celery worker of the fleet (Redis and Elasticsearch from DELF_ES_* settings)."""
    from delf_es.workers.app import make_app

    from delf_es.parallel import usable_cores

    settings = checked_of(ctx, model=False)
    processes = concurrency or usable_cores()
    if pool == "prefork" and not settings.torch_threads:
        # each prefork process gets its share of the cores (N processes x cores/N threads): two
        # processes of 2 threads on 2 cores oversubscribe them (delf_es/parallel.py)
        threads = max(1, usable_cores() // processes)
        settings = settings.model_copy(update={"torch_threads": threads})
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        celery_app = make_app(settings)
    except DelfEsError as error:
        fail(error)
    argv = ["worker", "-Q", queues, "-c", str(processes), "-P", pool,
            "--loglevel", loglevel, "-n", f"delf-{os.getpid()}@%h"]
    celery_app.worker_main(argv + (["-B"] if beat else []))


def enqueue(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="image files, folders, URLs or @list.txt"),
    metadata: Optional[str] = typer.Option(None, help="JSON object stored with every image"),
    wait: bool = typer.Option(True, help="follow the job until every image is indexed or failed"),
    timeout: Optional[float] = typer.Option(None, help="give up waiting after this many seconds"),
) -> None:
    """Submit images to the worker fleet; the progress bar follows indexing, not submission."""
    from delf_es.workers.app import make_submitter

    extra = json.loads(metadata) if metadata else {}
    paths = expand_inputs(inputs)
    try:
        submitter = make_submitter(checked_of(ctx, model=False))
    except DelfEsError as error:
        fail(error)
    with submitter:
        job = submitter.submit([(p, extra) for p in paths])
        console.print(f"job {job}: {len(paths)} images queued")
        if not wait:
            print(json.dumps({"job": job, "total": len(paths)}))
            return
        with progress() as bar:
            task = bar.add_task("indexed", total=len(paths))
            try:
                final = submitter.wait(
                    job, timeout=timeout,
                    on_progress=lambda p: bar.update(task, completed=p.done + len(p.failed)),
                )
            except DelfEsError as error:  # JobTimeout
                fail(error)
    for image_id, error in sorted(final.failed.items()):
        console.print(f"[yellow]failed[/yellow] {escape(str(image_id))}: {escape(str(error))}")
    print(json.dumps({"job": job, "total": final.total, "indexed": final.done, "failed": len(final.failed)}))
    if final.failed:
        raise typer.Exit(code=1)


def failures(ctx: typer.Context, limit: int = typer.Option(100)) -> None:
    """Images the workers could not index, newest first, with the error (JSON)."""
    from delf_es.sdk import DelfEs

    try:
        with DelfEs(checked_of(ctx, model=False)) as sdk:
            found = sdk.failures(limit)
    except DelfEsError as error:
        fail(error)
    print(json.dumps(found, indent=2))


def reindex(
    ctx: typer.Context,
    backbone: Optional[str] = typer.Option(None, help="backbone of the new index (default: the current settings')"),
    pca: Optional[Path] = typer.Option(None, help="PCA artifact of the new index (a path the workers can read)"),
    no_pca: bool = typer.Option(False, "--no-pca", help="raw descriptors"),
    attention_weights: Optional[Path] = typer.Option(None, help="trained attention head of the new index"),
    delete_old: bool = typer.Option(False, "--delete-old", help="delete the old indices after the swap (default: keep)"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="swap even if images failed (they are listed)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the live index is already of this model"),
    discard_other_builds: bool = typer.Option(False, "--discard-other-builds", help="delete an unfinished build of another model"),
    timeout: Optional[float] = typer.Option(None, help="give up waiting for the workers after this many seconds"),
) -> None:
    """Rebuild the index for a new model/PCA through the workers, check counts, swap the alias
    atomically (zero downtime).  Resumable: rerun after an interruption."""
    from delf_es.model.spec import ModelSpec
    from delf_es.workers.app import make_submitter
    from delf_es.workers.reindex import Reindexer

    # the new model: this run's settings (environment + global options) with the options above;
    # the workers receive it whole, so they extract exactly the model named here
    target: dict = {}
    if backbone:
        target["backbone"] = backbone
    if pca:
        target["pca_path"] = pca
    if no_pca:
        target.update(use_pca=False, pca_path=None)
    if attention_weights:
        target["attention_weights"] = attention_weights
    try:
        settings = checked_of(ctx, model=False)
        spec = ModelSpec.from_settings(checked_of(ctx, model=False, **target))
        model_id = spec.model_id
        with make_submitter(settings) as submitter:
            reindexer = Reindexer(settings, submitter, spec)
            console.print(f"reindexing {settings.index_alias} for model {model_id}")
            with progress() as bar:
                task = bar.add_task("re-extracted", total=None)
                result = reindexer.run(
                    delete_old=delete_old, allow_missing=allow_missing, force=force,
                    discard_other=discard_other_builds, timeout=timeout,
                    on_progress=lambda p: bar.update(task, total=p.total, completed=p.done + len(p.failed)),
                )
            reindexer.close()
    except DelfEsError as error:
        fail(error)
    for image_id, error in sorted(result.failed.items()):
        console.print(f"[yellow]failed[/yellow] {escape(str(image_id))}: {escape(str(error))}")
    print(json.dumps(result.as_dict()))
    if result.state == "incomplete":
        console.print(f"[red]not swapped:[/red] {result.target_count} of {result.source_count} images rebuilt; "
                      "rerun to resume, or --allow-missing")
        raise typer.Exit(code=1)


def kibana_import(
    ctx: typer.Context,
    url: str = typer.Argument(..., help="Kibana base URL, e.g. http://localhost:5601"),
    alias: Optional[str] = typer.Option(None, help="image alias the data views use (default: settings' index_alias)"),
    user: Optional[str] = typer.Option(None, help="basic-auth user (Kibana with security on)"),
    password: Optional[str] = typer.Option(None, envvar="DELF_ES_KIBANA_PASSWORD"),
) -> None:
    """Load the data views and the operations dashboard (mappings/kibana/) into Kibana."""
    from delf_es.workers.kibana import import_saved_objects

    try:
        answer = import_saved_objects(url, alias or checked_of(ctx, model=False).index_alias,
                                      auth=(user, password or "") if user else None)
    except DelfEsError as error:  # KibanaUnavailable
        fail(error)
    console.print(f"imported {answer.get('successCount', 0)} saved objects into {escape(str(url))}")
    print(json.dumps(answer))


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(enqueue)
    app.command()(reindex)
    app.command("kibana-import")(kibana_import)
    app.command()(failures)
