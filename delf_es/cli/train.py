"""``delf-es train backbone|attention``: the two DELF training stages from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from delf_es.cli.context import fail, settings_of
from delf_es.errors import DelfEsError

train_app = typer.Typer(no_args_is_help=True, help="Train the DELF stages: 1 = backbone, 2 = attention head.")

DATA_HELP = "ImageFolder root (one sub-folder per class) or a Google Landmarks v2 train.csv"


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in text.split(","))
    if any(s % 32 or s <= 0 for s in sizes):
        raise typer.BadParameter("view sizes must be positive multiples of 32")
    return sizes


@train_app.command("attention")
def attention_command(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="run folder: last.pt (resumable), log.csv, attention.pt, train.json"),
    images: Optional[Path] = typer.Option(None, help="image root of a GLDv2 train.csv (default: <csv dir>/train)"),
    background: Optional[Path] = typer.Option(None, help="folder of background/distractor images (no landmark)"),
    background_mode: str = typer.Option("negative", help="'negative' (uniform target) or 'class' (one extra class)"),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
    hidden: int = typer.Option(512, help="hidden channels of the head (DELF: 512)"),
    views: int = typer.Option(24, help="augmented views cached per image"),
    sizes: str = typer.Option("192,256,320,384", help="view sides, px, multiples of 32"),
    crop_min: float = typer.Option(0.5, help="smallest crop side, fraction of the short side"),
    holdout: float = typer.Option(0.2, help="held-out fraction (images, or views of single-image classes)"),
    seed: int = typer.Option(0),
    cache: Optional[Path] = typer.Option(None, help="view-feature cache folder (default: <data_dir>/train-views)"),
    resume: bool = typer.Option(False, "--resume", help="continue from <out>/last.pt"),
    stop_after: Optional[int] = typer.Option(None, help="end this session after that epoch (resume later)"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    export: Optional[Path] = typer.Option(None, help="also copy the trained head here (e.g. delf_es/weights/...)"),
) -> None:
    """Stage 2: train the attention head on cached maps of the frozen backbone (minutes on CPU)."""
    import shutil

    import torch

    from delf_es.train.attention_stage import AttentionConfig
    from delf_es.train.run import load_train_set, run_attention_training
    from delf_es.train.view_cache import ViewConfig

    settings = settings_of(ctx)
    if threads:
        torch.set_num_threads(threads)
    try:
        train_set = load_train_set(data, images, background)
        view_config = ViewConfig(views_per_image=views, sizes=_sizes(sizes), crop_range=(crop_min, 1.0), holdout=holdout, seed=seed)
        config = AttentionConfig(epochs=epochs, batch_size=batch_size, lr=lr, hidden=hidden,
                                 background_mode=background_mode, seed=seed)
        summary = run_attention_training(train_set, settings, view_config, config, out,
                                         cache or settings.data_dir / "train-views", resume=resume, stop_after=stop_after,
                                         command="delf-es " + " ".join(sys.argv[1:]))
    except (DelfEsError, ValueError) as error:
        fail(error)
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "attention.pt", export)
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"out": str(out), "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
                      "last": last, "head": str(export or out / "attention.pt")}, indent=2))


@train_app.command("backbone")
def backbone_command(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="run folder: last.pt (resumable), log.csv, backbone.pt, train.json"),
    images: Optional[Path] = typer.Option(None, help="image root of a GLDv2 train.csv (default: <csv dir>/train)"),
    background: Optional[Path] = typer.Option(None, help="folder of background/distractor images"),
    background_mode: str = typer.Option("negative", help="'negative' or 'class'"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(1e-3, help="SGD with momentum 0.9"),
    size: int = typer.Option(224, help="training crop side, px (multiple of 32)"),
    views: int = typer.Option(2, help="random views per image per epoch"),
    holdout: float = typer.Option(0.2),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from <out>/last.pt"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Stage 1 (optional, meant for a GPU and a landmark set): fine-tune the feature layers with
    cross-entropy on image labels.  Use the result with --backbone-weights <out>/backbone.pt."""
    import torch

    from delf_es.train.backbone_stage import BackboneConfig, train_backbone
    from delf_es.train.run import load_train_set

    settings = settings_of(ctx)
    if threads:
        torch.set_num_threads(threads)
    try:
        train_set = load_train_set(data, images, background)
        config = BackboneConfig(epochs=epochs, batch_size=batch_size, lr=lr, size=_sizes(str(size))[0],
                                views_per_epoch=views, holdout=holdout, background_mode=background_mode, seed=seed)
        summary = train_backbone(train_set, settings, config, out, resume=resume)
    except (DelfEsError, ValueError) as error:
        fail(error)
    print(json.dumps({"out": str(out), "epochs": summary["epochs"], "last": summary["history"][-1] if summary["history"] else {},
                      "weights": str(out / "backbone.pt")}, indent=2))


def _photos(folder: Path) -> list[Path]:
    from delf_es.train.data import IMAGE_SUFFIXES

    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise typer.BadParameter(f"no photos in {folder}")
    return found


def _pair_cache(photos: Path, cache: Optional[Path], size: int, pairs: int, seed: int, settings,
                folder: Optional[Path] = None):
    """The (photo, homography warp) pair cache of ``photos`` (built once, then reused); with
    ``folder``, that built cache, restricted to the pairs of photos still in ``photos``."""
    import torch

    from delf_es.model.delf import build_model
    from delf_es.train.geometry import PairCache, WarpConfig, build_pair_cache, restrict_to_photos

    if folder is not None:
        return restrict_to_photos(PairCache.load(folder), {p.name for p in _photos(photos)})

    config = WarpConfig(size=_sizes(str(size))[0], pairs_per_image=pairs, seed=seed)
    model, meta = build_model(settings.model_copy(update={"scoring": "norm"}))
    model = model.to(memory_format=torch.channels_last)
    return build_pair_cache(_photos(photos), model, meta, config, cache or settings.data_dir / "train-pairs", settings)


@train_app.command("pairs")
def pairs_command(
    ctx: typer.Context,
    photos: Path = typer.Argument(..., help="folder of unlabeled photos (e.g. from scripts/training_photos.py)"),
    cache: Optional[Path] = typer.Option(None, help="pair-map cache root (default: <data_dir>/train-pairs)"),
    size: int = typer.Option(320, help="view side, px (multiple of 32)"),
    pairs: int = typer.Option(2, help="(view, homography warp) pairs per photo"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Cache the frozen backbone's maps of (photo view, random homography warp) pairs: the input of
    ``train matchability`` and ``train descriptor`` (run once; the commands reuse it)."""
    import time

    import torch

    settings = settings_of(ctx)
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        built = _pair_cache(photos, cache, size, pairs, seed, settings)
    except (DelfEsError, ValueError) as error:
        fail(error)
    print(json.dumps({"cache": str(built.folder), "pairs": int(len(built.photos)),
                      "train": int((built.split == "train").sum()), "val": int((built.split == "val").sum()),
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


def _default_pca(settings):
    from delf_es.features import default_pca_path
    from delf_es.model.delf import build_model
    from delf_es.pca import PcaArtifact

    _, meta = build_model(settings.model_copy(update={"scoring": "norm"}))
    return PcaArtifact.load(settings.pca_path or default_pca_path(meta.backbone, meta.local_layer, "norm")), meta


@train_app.command("matchability")
def matchability_command(
    ctx: typer.Context,
    photos: Path = typer.Argument(..., help="folder of unlabeled photos (the pair cache of `train pairs`)"),
    out: Path = typer.Option(..., help="run folder: attention.pt, train.json"),
    objective: str = typer.Option("bce", help="'bce' (matchable or not) or 'rank' (pairwise ranking, AUC surrogate)"),
    cache: Optional[Path] = typer.Option(None, help="pair-map cache root (default: <data_dir>/train-pairs)"),
    size: int = typer.Option(320), pairs: int = typer.Option(2), seed: int = typer.Option(0),
    pair_cache: Optional[Path] = typer.Option(None, help="a built pair cache folder to use (its pairs of photos "
                                              "no longer in PHOTOS are left out)"),
    epochs: int = typer.Option(12), lr: float = typer.Option(1e-3), hidden: int = typer.Option(512),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    export: Optional[Path] = typer.Option(None, help="also copy the trained head here (e.g. delf_es/weights/...)"),
) -> None:
    """Matchability attention from geometry: the DELF head trained so its score ranks cells by
    whether their descriptor's mutual nearest neighbour lands where the homography says."""
    import shutil

    import torch

    from delf_es.train.geometry_stage import MatchabilityConfig, train_matchability

    settings = settings_of(ctx)
    if threads:
        torch.set_num_threads(threads)
    try:
        built = _pair_cache(photos, cache, size, pairs, seed, settings, pair_cache)
        pca, meta = _default_pca(settings)
        config = MatchabilityConfig(objective=objective, epochs=epochs, lr=lr, hidden=hidden, seed=seed)
        provenance = {"backbone": meta.backbone, "local_layer": meta.local_layer, "backbone_digest": meta.backbone_digest,
                      "images": built.num_photos, "background_images": 0, "target_pca": pca.id,
                      "trained_on": f"(view, homography warp) pairs of {built.num_photos} photos in {photos} (scripts/training_photos.py)",
                      "command": "delf-es " + " ".join(sys.argv[1:])}
        summary = train_matchability(built, pca, config, out, provenance)
    except (DelfEsError, ValueError) as error:
        fail(error)
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "attention.pt", export)
    print(json.dumps({"out": str(out), "train_seconds": summary["train_seconds"], "val": summary["val"],
                      "last": summary["history"][-1]}, indent=2))


@train_app.command("descriptor")
def descriptor_command(
    ctx: typer.Context,
    photos: Path = typer.Argument(..., help="folder of unlabeled photos (the pair cache of `train pairs`)"),
    out: Path = typer.Option(..., help="artifact .npz (with .json and .train.json beside it)"),
    cache: Optional[Path] = typer.Option(None, help="pair-map cache root (default: <data_dir>/train-pairs)"),
    size: int = typer.Option(320), pairs: int = typer.Option(2), seed: int = typer.Option(0),
    pair_cache: Optional[Path] = typer.Option(None, help="a built pair cache folder to use (its pairs of photos "
                                              "no longer in PHOTOS are left out)"),
    epochs: int = typer.Option(15), lr: float = typer.Option(1e-3),
    temperature: float = typer.Option(0.07), reconstruction: float = typer.Option(1.0),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Learned local descriptor from geometry: a 720 -> 40 projection (initialised from the PCA)
    trained with InfoNCE over true correspondences plus reconstruction; use with --pca-path."""
    import torch

    from delf_es.train.geometry_stage import DescriptorConfig, train_descriptor

    settings = settings_of(ctx)
    if threads:
        torch.set_num_threads(threads)
    try:
        built = _pair_cache(photos, cache, size, pairs, seed, settings, pair_cache)
        pca, _ = _default_pca(settings)
        config = DescriptorConfig(epochs=epochs, lr=lr, temperature=temperature, reconstruction=reconstruction, seed=seed)
        summary = train_descriptor(built, pca, config, out, {
            "fitted_on": f"(view, homography warp) pairs of {built.num_photos} photos in {photos} (scripts/training_photos.py)",
            "command": "delf-es " + " ".join(sys.argv[1:])})
    except (DelfEsError, ValueError) as error:
        fail(error)
    print(json.dumps({"out": str(out), "artifact": summary["artifact"], "train_seconds": summary["train_seconds"],
                      "val": summary["val"], "last": summary["history"][-1]}, indent=2))
