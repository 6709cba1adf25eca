"""Command line: a thin shell around the library (args -> settings -> library -> files).

The global options (model, scales, device...) become a :class:`~delf_es.cli.context.CliContext`
in the typer context (``ctx.obj``); every command builds its Settings from it, so a run carries
no module or class state.  One module per group of commands, each registering itself here:

* :mod:`~delf_es.cli.features`: extract, match, fit-pca, attention;
* :mod:`~delf_es.cli.search`: index, search, delete, stats, demo;
* :mod:`~delf_es.cli.evaluate`: eval;
* :mod:`~delf_es.cli.workers`: worker, enqueue, failures, reindex, kibana-import;
* :mod:`~delf_es.cli.train`: ``train attention|backbone``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer

from delf_es.cli import evaluate, features, search, workers
from delf_es.cli.context import CliContext
from delf_es.cli.train import train_app

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
    overrides: dict[str, Any] = {}
    if backbone:
        overrides["backbone"] = backbone
    if backbone_weights:
        overrides["backbone_weights"] = backbone_weights
    if scales:
        try:
            overrides["scales"] = tuple(float(s) for s in scales.split(","))
        except ValueError:
            raise typer.BadParameter(f"--scales is comma-separated numbers, got {scales!r}") from None
    if max_features:
        overrides["max_feature_num"] = max_features
    if pca:
        overrides["pca_path"] = pca
    if no_pca:
        overrides["use_pca"] = False
    if device:
        overrides["device"] = device
    if scoring:
        overrides["scoring"] = scoring
    if attention_weights:
        overrides["attention_weights"] = attention_weights
    ctx.obj = CliContext(overrides)


for _group in (features, search, evaluate, workers):
    _group.register(app)
app.add_typer(train_app, name="train")
