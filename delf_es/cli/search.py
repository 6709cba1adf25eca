"""``delf-es index | search | delete | stats | demo``: the SDK from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from delf_es.cli.context import checked_of, console, expand_inputs, fail
from delf_es.errors import DelfEsError, InvalidRequest


def engine(ctx: typer.Context, model: bool = True):
    from delf_es.sdk import DelfEs

    return DelfEs(checked_of(ctx, model=model, index=True))


def index(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="image files, folders, URLs or @list.txt"),
    metadata: Optional[str] = typer.Option(None, help="JSON object stored with every image"),
    reindex: bool = typer.Option(False, "--reindex", help="re-extract images that are already indexed"),
) -> None:
    """Index images (resumable: ids already in the index are skipped).  Work is committed every
    image or second (DELF_ES_COMMIT_SECONDS); Ctrl-C saves what is extracted and says how much."""
    import signal

    from delf_es.errors import Interrupted
    from delf_es.items import check_metadata
    from delf_es.validation import parse_json_object

    try:
        extra = check_metadata(parse_json_object(metadata, "--metadata"))
    except DelfEsError as error:
        fail(error)
    paths = expand_inputs(inputs)
    # SIGTERM (a service manager, `kill`) gets the same orderly stop as Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with engine(ctx) as sdk:
        def interrupted(saved: int) -> NoReturn:
            console.print(f"[red]interrupted:[/red] {saved} image(s) saved in this run, "
                          f"{sdk.count()} in the index; run the same command again to continue")
            raise typer.Exit(code=130)

        try:
            report = sdk.bulk_add([(p, extra) if extra else p for p in paths], skip_existing=not reindex)
        except Interrupted as stop:  # before DelfEsError: it is one too
            interrupted(len(stop.report.succeeded))
        except DelfEsError as error:
            fail(error)
        try:  # a Ctrl-C after the last commit: everything is saved, and the user is told so
            for failure in report.failed:
                console.print(f"[yellow]failed[/yellow] {escape(failure.item_id)}: {escape(failure.error)}")
            skipped = len(paths) - len(report.succeeded) - len(report.failed)
            console.print(f"{len(report.succeeded)} indexed, {skipped} already there, {len(report.failed)} failed; "
                          f"{sdk.count()} images in the index")
        except KeyboardInterrupt:
            interrupted(len(report.succeeded))
    if report.failed:
        raise typer.Exit(code=1)


def search(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="query image path or URL"),
    limit: int = typer.Option(10, min=1, help="hits shown (>= 1)"),
    pre_filter: Optional[str] = typer.Option(None, "--filter", help="Elasticsearch query on metadata, as JSON"),
    all_orientations: bool = typer.Option(False, "--all-orientations"),
    show: Optional[Path] = typer.Option(None, help="draw the query beside its top hits with match lines"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Search the index with an image; prints a ranked table (and, with --show, draws the top
    hits whose files can still be read, naming those that cannot)."""
    from rich.table import Table

    from delf_es.validation import parse_json_object

    settings = checked_of(ctx, index=True)
    try:
        metadata_filter = parse_json_object(pre_filter, "--filter", '{"term": {"metadata.city": "paris"}}')
        if metadata_filter is not None and settings.index_backend() != "elasticsearch":  # checked now, not after extraction
            from delf_es.index.filters import compile_filter

            compile_filter(metadata_filter)
        if show is not None:
            from delf_es.outputs import prepare_output_folder

            prepare_output_folder(show.parent if str(show.parent) else Path("."))
    except DelfEsError as error:
        fail(error)
    if show is not None and all_orientations:  # the pairs of a turned query are not in the query's frame
        fail(InvalidRequest("--show draws the search's own matches, in the query's orientation: not with "
                            "--all-orientations"))
    with engine(ctx) as sdk:
        try:
            if show is None:
                hits = sdk.search_image(image, all_orientations=all_orientations, limit=limit,
                                        pre_filter=metadata_filter)
            else:  # the verified pairs come with the hits: the figure draws what the search decided
                _, query = sdk.load(image, None, False)
                found = sdk.search_loaded(query, pre_filter=metadata_filter, limit=limit, matches=True).hits
                hits = [{k: v for k, v in hit.items() if k != "matches"} for hit in found]
        except DelfEsError as error:
            fail(error)
        if as_json:
            print(json.dumps(hits, indent=2))
        else:
            table = Table(title=escape(f"{len(hits)} matches for {image}"))
            for column in ("rank", "id", "inliers", "votes", "dist", "metadata"):
                table.add_column(column)
            for rank, hit in enumerate(hits, 1):
                table.add_row(str(rank), escape(hit["id"]), str(hit["inliers"]), str(hit["votes"]),
                              f"{hit['dist']:.3f}", escape(json.dumps(hit["metadata"])[:60]))
            Console().print(table)
        if show is not None:  # after the results are out: a missing file cannot lose them
            try:
                figure, missing, _ = draw_search(sdk, query, found, show)
            except DelfEsError as error:
                fail(error)
            for hit_id, reason in missing:
                console.print(f"[yellow]not drawn[/yellow] {escape(hit_id)}: {escape(reason)}")
            console.print(f"figure: {escape(str(figure))}")


def draw_search(sdk, query, hits: list[dict], out: Path, top: int = 3) -> tuple[Path, list[tuple[str, str]], list[int]]:
    """Query beside each of its top hits, stacked vertically, with the search's own verified pairs
    drawn: ``hits`` from :meth:`DelfEs.search_loaded` with ``matches=True`` (nothing is matched
    again here, so the figure shows exactly the inliers the search counted).  Hits whose image
    file is missing, moved or unreadable are left out.  Returns the figure, ``[(hit id, why)]``
    for those left out and the inliers drawn per panel."""
    from PIL import Image

    from delf_es.draw import draw_matches, stack_vertically
    from delf_es.types import Correspondences

    panels, missing, drawn = [], [], []
    for hit in hits[:top]:
        try:
            _, image = sdk.load(hit["path"], None, False)
        except DelfEsError as error:
            missing.append((hit["id"], str(error)))
            continue
        pairs = np.asarray(hit.get("matches", []), np.float32).reshape(-1, 4)  # [qx, qy, x, y] px
        pair_index = np.repeat(np.arange(len(pairs), dtype=np.int64)[:, None], 2, axis=1)
        verified = Correspondences(pair_index, np.ones(len(pairs), bool), None, sdk.settings.ransac_model)
        panel = out.with_suffix(f".{len(panels)}.png")
        draw_matches(query.pixels, image.pixels, pairs[:, :2], pairs[:, 2:], verified, panel)
        with Image.open(panel) as figure:
            panels.append(figure.convert("RGB"))
        drawn.append(verified.num_inliers)
        panel.unlink()
    if not panels:
        panels = [Image.fromarray(query.pixels)]
    return stack_vertically(panels, out), missing, drawn


def delete(ctx: typer.Context, image_id: str = typer.Argument(...)) -> None:
    """Remove an image from the index."""
    with engine(ctx) as sdk:
        try:
            sdk.delete_image(image_id, refresh_after=True)
        except DelfEsError as error:
            fail(error)
    console.print(f"deleted {escape(image_id)}")


def stats(ctx: typer.Context) -> None:
    """Index size and the model that produced it."""
    with engine(ctx) as sdk:
        try:
            info = {"backend": type(sdk.backend).__name__, "images": sdk.count(), "model_id": sdk.model_id,
                    "index": sdk.settings.es_url or str(sdk.settings.data_dir / sdk.settings.index_alias)}
        except DelfEsError as error:
            fail(error)
    print(json.dumps(info, indent=2))


def demo(ctx: typer.Context, out: Path = typer.Option(Path("out"), help="folder for the demo's index and figures")) -> None:
    """The main job on bundled photos, no server needed: index scikit-image's sample photos into an
    embedded index, search with another view of one of them, draw the verified matches."""
    from delf_es.sdk import DelfEs
    from delf_es.samples import database_photos, sample_pair

    out.mkdir(parents=True, exist_ok=True)
    settings = checked_of(ctx, index=True, es_url=None, redis_url=None, data_dir=out / "index")
    _, query = sample_pair()
    try:
        with DelfEs(settings) as sdk:
            report = sdk.bulk_add([str(p) for p in database_photos()], skip_existing=True)
            _, loaded = sdk.load(str(query), None, False)
            found = sdk.search_loaded(loaded, limit=5, matches=True).hits
            hits = [{k: v for k, v in hit.items() if k != "matches"} for hit in found]
            figure, _, drawn = draw_search(sdk, loaded, found, out / "demo_search.png", top=1)
            count = sdk.count()
    except DelfEsError as error:
        fail(error)
    console.print(f"indexed {len(report.succeeded)} new photos ({count} in {escape(str(settings.data_dir))}); "
                  f"query {query.name}:")
    for rank, hit in enumerate(hits, 1):
        console.print(f"  {rank}. {escape(Path(hit['id']).name)}  inliers={hit['inliers']}  votes={hit['votes']}")
    console.print(f"figure: {escape(str(figure))} ({', '.join(map(str, drawn)) or 'no'} inliers drawn: the search's own)")
    print(json.dumps({"query": str(query), "hits": [{k: h[k] for k in ("id", "inliers", "dist")} for h in hits],
                      "figure": str(figure), "figure_inliers": drawn}))


def register(app: typer.Typer) -> None:
    for command in (index, search, delete, stats, demo):
        app.command()(command)
