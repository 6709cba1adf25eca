"""``delf-es index | search | delete | stats | demo``: the SDK from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from delf_es.cli.context import console, fail, settings_of
from delf_es.errors import DelfEsError
from delf_es.items import expand_inputs


def engine(ctx: typer.Context):
    from delf_es.sdk import DelfEs

    return DelfEs(settings_of(ctx))


def index(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="image files, folders, URLs or @list.txt"),
    metadata: Optional[str] = typer.Option(None, help="JSON object stored with every image"),
    reindex: bool = typer.Option(False, "--reindex", help="re-extract images that are already indexed"),
) -> None:
    """Index images (resumable: ids already in the index are skipped)."""
    extra = json.loads(metadata) if metadata else None
    paths = expand_inputs(inputs)
    with engine(ctx) as sdk:
        try:
            report = sdk.bulk_add([(p, extra) if extra else p for p in paths], skip_existing=not reindex)
        except DelfEsError as error:
            fail(error)
        for failure in report.failed:
            console.print(f"[yellow]failed[/yellow] {failure.item_id}: {failure.error}")
        skipped = len(paths) - len(report.succeeded) - len(report.failed)
        console.print(f"{len(report.succeeded)} indexed, {skipped} already there, {len(report.failed)} failed; "
                      f"{sdk.count()} images in the index")
    if report.failed:
        raise typer.Exit(code=1)


def search(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="query image path or URL"),
    limit: int = typer.Option(10),
    pre_filter: Optional[str] = typer.Option(None, "--filter", help="Elasticsearch query on metadata, as JSON"),
    all_orientations: bool = typer.Option(False, "--all-orientations"),
    show: Optional[Path] = typer.Option(None, help="draw the query beside its top hits with match lines"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Search the index with an image; prints a ranked table."""
    from rich.table import Table

    with engine(ctx) as sdk:
        try:
            matches = sdk.search_verified(image, all_orientations=all_orientations, limit=limit,
                                          pre_filter=json.loads(pre_filter) if pre_filter else None)
            hits = [match.result for match in matches]
            if show is not None:
                draw_search(sdk, matches, show)
        except DelfEsError as error:
            fail(error)
    if as_json:
        print(json.dumps(hits, indent=2))
        return
    table = Table(title=f"{len(hits)} matches for {image}")
    for column in ("rank", "id", "inliers", "votes", "dist", "metadata"):
        table.add_column(column)
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), hit["id"], str(hit["inliers"]), str(hit["votes"]), f"{hit['dist']:.3f}",
                      json.dumps(hit["metadata"])[:60])
    Console().print(table)  # stdout: the result, not a progress message


def draw_search(sdk, matches: list, out: Path, top: int = 3) -> tuple[Path, list[int]]:
    """Query beside each of its top ``matches`` (:meth:`DelfEs.search_verified`), the search's own
    verified correspondences drawn, stacked vertically.  Returns the figure and the inlier count
    drawn in each panel (the search's counts: nothing is matched again here)."""
    from PIL import Image

    from delf_es.draw import draw_matches, stack_vertically
    from delf_es.types import Correspondences

    panels, drawn = [], []
    for match in matches[:top]:
        _, image = sdk.load(match.result["path"], None, False)
        verified = match.correspondences or Correspondences(
            np.zeros((0, 2), np.int64), np.zeros(0, bool), None, sdk.settings.ransac_model)
        panel = out.with_suffix(f".{len(panels)}.png")
        draw_matches(match.query_pixels, image.pixels, match.query_keypoints, match.keypoints, verified, panel)
        panels.append(Image.open(panel).convert("RGB"))
        drawn.append(verified.num_inliers)
        panel.unlink()
    if not panels:
        return stack_vertically([Image.new("RGB", (64, 64), "white")], out), drawn
    return stack_vertically(panels, out), drawn


def delete(ctx: typer.Context, image_id: str = typer.Argument(...)) -> None:
    """Remove an image from the index."""
    with engine(ctx) as sdk:
        try:
            sdk.delete_image(image_id, refresh_after=True)
        except DelfEsError as error:
            fail(error)
    console.print(f"deleted {image_id}")


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
    settings = settings_of(ctx, es_url=None, redis_url=None, data_dir=out / "index")
    _, query = sample_pair()
    try:
        with DelfEs(settings) as sdk:
            report = sdk.bulk_add([str(p) for p in database_photos()], skip_existing=True)
            matches = sdk.search_verified(str(query), limit=5)
            hits = [match.result for match in matches]
            figure, drawn = draw_search(sdk, matches, out / "demo_search.png", top=1)
            count = sdk.count()
    except DelfEsError as error:
        fail(error)
    console.print(f"indexed {len(report.succeeded)} new photos ({count} in {settings.data_dir}); "
                  f"query {query.name}:")
    for rank, hit in enumerate(hits, 1):
        console.print(f"  {rank}. {Path(hit['id']).name}  inliers={hit['inliers']}  votes={hit['votes']}")
    console.print(f"figure: {figure} ({', '.join(map(str, drawn)) or 'no'} inliers drawn: the search's own)")
    print(json.dumps({"query": str(query), "hits": [{k: h[k] for k in ("id", "inliers", "dist")} for h in hits],
                      "figure": str(figure), "figure_inliers": drawn}))


def register(app: typer.Typer) -> None:
    for command in (index, search, delete, stats, demo):
        app.command()(command)
