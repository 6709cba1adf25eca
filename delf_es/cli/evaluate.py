"""``delf-es eval``: retrieval quality on a gt.json set (mAP, recall, timings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from delf_es.cli.context import checked_of, fail
from delf_es.errors import DelfEsError, InvalidRequest


def eval_command(
    ctx: typer.Context,
    gt_json: Path = typer.Argument(..., help="ground truth in the paris250 gt.json format"),
    distractors: list[Path] = typer.Option([], "--distractors", help="folders of extra negatives"),
    backend: str = typer.Option("embedded", help="embedded or elasticsearch (uses DELF_ES_ES_URL / --es-url)"),
    es_url: Optional[str] = typer.Option(None, help="Elasticsearch URL for --backend elasticsearch"),
    config: Optional[Path] = typer.Option(None, help="JSON file of settings overrides (a search configuration)"),
    label: str = typer.Option("delf-es", help="name of this run in the results"),
    out: Path = typer.Option(Path("benchmarks/results/eval"), help="folder for JSON and plots"),
    cache: Optional[Path] = typer.Option(None, help="feature cache folder (default: <data_dir>/features)"),
    figures: bool = typer.Option(True, help="write the AP plot and the worst-queries figure"),
    hits: bool = typer.Option(False, help="store every ranked hit per query (for benchmarks/rank_by.py)"),
    maps: Optional[Path] = typer.Option(None, help="backbone-map cache folder (delf_es/eval/map_cache.py): a new head "
                                        "or descriptor projection is scored without re-running the backbone; its "
                                        "features equal extraction up to float16, so give it its own --cache"),
) -> None:
    """Evaluate retrieval on a gt.json set: mAP (Revisited Oxford/Paris), R@1/5/10, timings."""
    from delf_es.eval.gt import load_ground_truth
    from delf_es.eval.plots import ap_bars, worst_queries
    from delf_es.eval.run import evaluate

    from delf_es.safe_files import read_regular_file
    from delf_es.validation import parse_json_object

    try:
        extra = parse_json_object(read_regular_file(config, 1 << 20).decode("utf-8", "replace"), "--config",
                                  '{"shortlist_mode": "global"}') if config else {}
    except DelfEsError as error:
        fail(error)
    if backend == "elasticsearch":
        extra["es_url"] = es_url or checked_of(ctx, model=False).es_url
        if not extra["es_url"]:
            fail(InvalidRequest("--backend elasticsearch needs --es-url or DELF_ES_ES_URL"))
    elif backend == "embedded":
        extra["es_url"] = None
    else:
        fail(InvalidRequest("--backend is embedded or elasticsearch"))
    settings = checked_of(ctx, **extra)
    try:
        extractor = None
        if maps is not None:
            from delf_es.eval.map_cache import MapCachedExtractor

            extractor = MapCachedExtractor(settings, maps)
        result = evaluate(gt_json, distractors, settings, out, cache or settings.data_dir / "features", label=label,
                          keep_hits=hits, extractor=extractor)
        if figures:
            ap_bars(result, out / f"{label}-ap.png")
            from delf_es.features import Extractor

            worst_queries(result, load_ground_truth(gt_json), settings, Extractor(settings), out / f"{label}-worst.png")
    except DelfEsError as error:
        fail(error)
    summary = {k: result[k] for k in ("label", "mAP", "R@1", "R@5", "R@10", "extract_s_per_image_median",
                                       "search_ms_median", "model_id")}
    print(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
