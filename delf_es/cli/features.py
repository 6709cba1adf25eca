"""``delf-es extract | match | fit-pca | attention``: features of images, without an index."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from delf_es.cli.context import checked_of, console, expand_inputs, fail, progress
from delf_es.errors import DelfEsError
from delf_es.settings import Settings


def extract(
    ctx: typer.Context,
    images: list[str] = typer.Argument(..., help="image files, folders or @list.txt"),
    out: Path = typer.Option(Path("features"), help="folder for <name>.npz feature files"),
) -> None:
    """Extract DELF features of images into compact .npz files: ``<stem>.npz``, or
    ``<stem>-<hash of the path>.npz`` when inputs share a stem; never over another image's file."""
    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.degenerate import drop_flat_keypoints
    from delf_es.outputs import feature_file_names, prepare_output_folder, write_features

    settings = checked_of(ctx)
    try:
        prepare_output_folder(out)
    except DelfEsError as error:
        fail(error)
    names = feature_file_names(expand_inputs(images))  # one entry per file, however spelled
    try:
        extractor = Extractor(settings)
    except DelfEsError as error:
        fail(error)
    failures = 0
    with progress() as bar:
        task = bar.add_task("extracting", total=len(names))
        for path, name in names.items():
            try:
                image = load_image(path, settings)
                features = drop_flat_keypoints(extractor.extract(image.pixels, image_id=path), image.pixels,
                                               settings.min_keypoint_contrast, settings.max_image_size)
                write_features(features, out / name)
            except DelfEsError as error:
                failures += 1
                console.print(f"[yellow]skipped[/yellow] {escape(str(error))}")
            bar.advance(task)
    console.print(f"{len(names) - failures} extracted into {escape(str(out))}, {failures} failed; "
                  f"model {extractor.model_id}")
    if failures:
        raise typer.Exit(code=1)


def match(
    ctx: typer.Context,
    image_a: str = typer.Argument(...),
    image_b: str = typer.Argument(...),
    out: Path = typer.Option(Path("match.png"), help="figure of the verified correspondences"),
    model: Optional[str] = typer.Option(None, help="homography (default), fundamental or affine"),
) -> None:
    """Match two images, verify geometrically and draw the inlier correspondences."""
    try:
        result = run_match(image_a, image_b, out, checked_of(ctx, **({"ransac_model": model} if model is not None else {})))
    except DelfEsError as error:
        fail(error)
    print(json.dumps(result))


def run_match(image_a: str, image_b: str, out: Path, settings: Settings) -> dict:
    from delf_es.degenerate import drop_flat_keypoints
    from delf_es.draw import draw_matches
    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.verify import verify

    extractor = Extractor(settings)
    loaded = [load_image(p, settings) for p in (image_a, image_b)]
    feats = [drop_flat_keypoints(extractor.extract(im.pixels, image_id=str(p)), im.pixels, settings.min_keypoint_contrast,
                                 settings.max_image_size) for im, p in zip(loaded, (image_a, image_b))]
    correspondences = verify(feats[0], feats[1], settings)
    draw_matches(loaded[0].pixels, loaded[1].pixels, feats[0].keypoints, feats[1].keypoints, correspondences, out)
    return {
        "a": image_a,
        "b": image_b,
        "keypoints": [f.num_keypoints for f in feats],
        "matches": int(len(correspondences.matches)),
        "inliers": correspondences.num_inliers,
        "model": correspondences.model_kind,
        "figure": str(out),
    }


def fit_pca_command(
    ctx: typer.Context,
    images: list[str] = typer.Argument(..., help="training images (never an evaluation set), folders or @list.txt"),
    out: Path = typer.Option(..., help="where to write the PCA artifact (.npz, plus a .json summary)"),
    dims: int = typer.Option(40, min=1, help="output dimensions"),
    fitted_on: str = typer.Option("", help="what the images are, recorded in the artifact"),
    max_per_image: int = typer.Option(1000, min=1, help="keypoints taken from each image"),
) -> None:
    """Fit the L2 -> PCA -> L2 reduction on descriptors of the given images."""
    import numpy as np

    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.pca import PcaProvenance, fit_pca

    settings = checked_of(ctx, use_pca=False, max_feature_num=max_per_image)
    try:
        extractor = Extractor(settings)
    except DelfEsError as error:
        fail(error)
    paths = expand_inputs(images)
    chunks, used = [], 0
    with progress() as bar:
        task = bar.add_task("extracting", total=len(paths))
        for path in paths:
            try:
                chunks.append(extractor.extract_raw(load_image(path, settings).pixels).descriptors)
                used += 1
            except DelfEsError as error:
                console.print(f"[yellow]skipped[/yellow] {escape(str(error))}")
            bar.advance(task)
    descriptors = np.concatenate(chunks) if chunks else np.zeros((0, extractor.meta.local_dim), np.float32)
    provenance = PcaProvenance(
        backbone=extractor.meta.backbone,
        local_layer=extractor.meta.local_layer,
        scoring=extractor.meta.scoring,
        fitted_on=fitted_on or f"{used} images",
        num_images=used,
        num_descriptors=int(len(descriptors)),
        command="delf-es " + " ".join(sys.argv[1:]) if sys.argv else "",
    )
    try:
        artifact = fit_pca(descriptors, dims, provenance)
    except DelfEsError as error:
        fail(error)
    artifact.save(out)
    kept = float(artifact.explained_variance.sum())
    console.print(f"PCA {artifact.id}: {len(descriptors)} descriptors from {used} images, variance kept {kept:.3f} -> "
                  f"{escape(str(out))}")


def attention(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="image file"),
    out: Path = typer.Option(Path("attention.png"), help="figure: the score map over the image + selected keypoints"),
    scale: float = typer.Option(1.0, min=1e-3, help="pyramid scale whose score map is drawn (> 0)"),
) -> None:
    """Show what the model looks at: keypoint scores (the attention head, or descriptor norms
    under norm scoring) over the image and the keypoints extraction keeps."""
    from delf_es.attention_map import draw_attention, score_map
    from delf_es.features import Extractor
    from delf_es.imageio import load_image

    settings = checked_of(ctx)
    try:
        extractor = Extractor(settings)
        pixels = load_image(image, settings).pixels
        scores = score_map(extractor, pixels, scale)
        raw = extractor.extract_raw(pixels)
    except DelfEsError as error:
        fail(error)
    title = f"{extractor.meta.scoring} scores at scale {scale:g}; {len(raw.keypoints)} keypoints (all scales)\n{extractor.model_id}"
    draw_attention(pixels, scores, raw.keypoints, raw.scales, title, out)
    print(json.dumps({"image": image, "figure": str(out), "scoring": extractor.meta.scoring, "model_id": extractor.model_id,
                      "keypoints": int(len(raw.keypoints)), "score_map": list(scores.shape)}))


def register(app: typer.Typer) -> None:
    app.command()(extract)
    app.command()(match)
    app.command("fit-pca")(fit_pca_command)
    app.command()(attention)
