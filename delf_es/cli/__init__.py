"""Command line: a thin shell around the library (args -> settings -> library -> files).

The global options (model, scales, device...) become a :class:`~delf_es.cli.context.CliContext`
in the typer context (``ctx.obj``); every command builds its Settings from it, so a run carries
no module or class state.  One module per group of commands, each registering itself here:

* :mod:`~delf_es.cli.features`: extract, match, fit-pca, attention;
* :mod:`~delf_es.cli.search`: index, search, delete, stats, demo;
* :mod:`~delf_es.cli.evaluate`: eval;
* :mod:`~delf_es.cli.serving`: serve (the HTTP API);
* :mod:`~delf_es.cli.workers`: worker, enqueue, failures, reindex, kibana-import;
* :mod:`~delf_es.cli.train`: ``train attention|backbone``;
* :mod:`~delf_es.cli.services`: ``services start|stop|status`` (local Elasticsearch and Redis).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from delf_es.cli import evaluate, features, search, serving, services, workers
from delf_es.cli.context import CliContext, console, fail
from delf_es.cli.train import train_app
from delf_es.errors import InvalidSetting

app = typer.Typer(add_completion=False, no_args_is_help=True, help="delf-es: instance-level image search.")


@app.callback()
def main(
    ctx: typer.Context,
    backbone: Optional[str] = typer.Option(None, help="efficientnet-lite2 (default), efficientnet-lite0, mobilenetv2, resnet50"),
    backbone_weights: Optional[Path] = typer.Option(None, help="state_dict file (required for resnet50)"),
    scales: Optional[str] = typer.Option(None, help="comma-separated pyramid scales, e.g. 0.5,0.7071,1"),
    max_features: Optional[int] = typer.Option(None, help="keypoints kept per image (default 1000)"),
    pca: Optional[Path] = typer.Option(None, help="PCA artifact (default: the shipped one)"),
    no_pca: bool = typer.Option(False, "--no-pca", help="keep raw descriptors"),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda"),
    scoring: Optional[str] = typer.Option(None, help="keypoint scores: auto (default: the shipped head if any), attention, norm"),
    attention_weights: Optional[Path] = typer.Option(None, help="attention head file (default: the shipped one)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The Elasticsearch client logs every failed attempt with urllib3's traceback (~60 lines per
    # call when the server is down); the IndexUnavailable that follows says it in one line.
    for noisy in ("elastic_transport", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from delf_es.validation import unknown_variables

    for warning in unknown_variables():
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    overrides: dict = {}
    # "is not None", never truthiness: --max-features 0 or --scales "" must be refused, not ignored
    if backbone is not None:
        overrides["backbone"] = backbone
    if backbone_weights is not None:
        overrides["backbone_weights"] = backbone_weights
    if scales is not None:
        overrides["scales"] = _parse_scales(scales)
    if max_features is not None:
        overrides["max_feature_num"] = max_features
    if pca is not None:
        overrides["pca_path"] = pca
    if no_pca:
        overrides["use_pca"] = False
    if device is not None:
        overrides["device"] = device
    if scoring is not None:
        overrides["scoring"] = scoring
    if attention_weights is not None:
        overrides["attention_weights"] = attention_weights
    ctx.obj = CliContext(overrides)


def _parse_scales(text: str) -> tuple[float, ...]:
    import math

    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        fail(InvalidSetting(f"--scales {text!r}: comma-separated positive numbers, e.g. 0.7071,1,1.4142"))
    if not all(math.isfinite(v) and v > 0 for v in values):
        fail(InvalidSetting(f"--scales {text!r}: every scale must be a positive finite number"))
    return values


for _group in (features, search, evaluate, serving, workers, services):
    _group.register(app)
app.add_typer(train_app, name="train")
