"""Command line: a thin shell around the library (args -> settings -> library -> files)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Iterable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from delf_es.errors import DelfEsError
from delf_es.settings import Settings
from delf_es.train.cli import train_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="delf-es: instance-level image search.")
app.add_typer(train_app, name="train")
console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line, whatever the width


#: Settings field -> the global option that sets it (for error messages).
OPTION_NAMES = {"backbone": "--backbone", "backbone_weights": "--backbone-weights", "scales": "--scales",
                "max_feature_num": "--max-features", "pca_path": "--pca", "use_pca": "--no-pca", "device": "--device",
                "scoring": "--scoring", "attention_weights": "--attention-weights"}


class State:
    """Settings overrides collected by the top-level options, built once per run."""

    overrides: dict = {}

    @classmethod
    def settings(cls, **extra) -> Settings:
        """Validated settings (delf_es/validation.py); raises InvalidSetting (a DelfEsError)."""
        from delf_es.validation import load_settings

        return load_settings({**cls.overrides, **extra}, OPTION_NAMES)

    @classmethod
    def checked(cls, *, model: bool = True, index: bool = False, **extra) -> Settings:
        """Settings checked before anything heavy runs (device, files, index folder, URLs);
        a problem ends the command with a one-line error."""
        from delf_es.validation import preflight

        try:
            return preflight(cls.settings(**extra), model=model, index=index,
                             overrides={**cls.overrides, **extra}, options=OPTION_NAMES)
        except DelfEsError as error:
            fail(error)


@app.callback()
def main(
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
    State.overrides = overrides


def _parse_scales(text: str) -> tuple[float, ...]:
    import math

    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        fail(ValueError(f"--scales {text!r}: comma-separated positive numbers, e.g. 0.7071,1,1.4142"))
    if not all(math.isfinite(v) and v > 0 for v in values):
        fail(ValueError(f"--scales {text!r}: every scale must be a positive finite number"))
    return values


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files as given; folders expanded to the images below them (sorted); ``@list.txt`` read line
    by line (delf_es/inputs.py: special files are never read, so a FIFO cannot hang the run).
    A bad ``@list`` or no image at all ends the command with a one-line error; an unreadable
    sub-folder is reported."""
    inputs = list(inputs)
    from delf_es.inputs import IMAGE_SUFFIXES, expand_inputs as expand

    try:
        found = expand(inputs)
    except DelfEsError as error:
        fail(error)
    for problem in found.unreadable:
        console.print(f"[yellow]skipped[/yellow] {escape(str(problem))}")
    if not found.sources:  # an empty folder or list: say so rather than "0 extracted"
        from delf_es.errors import UnreadableFile

        fail(UnreadableFile(f"no image files found (image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})",
                            " ".join(inputs)))
    return found.sources


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )


def fail(error: Exception) -> None:
    from delf_es.errors import IndexUnavailable

    message = str(error)
    if isinstance(error, IndexUnavailable) and message.startswith("Elasticsearch at "):
        message += " -- is it running? Check DELF_ES_ES_URL, or start it with scripts/services.sh start"
    console.print(f"[red]error:[/red] {escape(message)}")  # paths may hold "[...]": never markup
    raise typer.Exit(code=2)


@app.command()
def extract(
    images: list[str] = typer.Argument(..., help="image files, folders or @list.txt"),
    out: Path = typer.Option(Path("features"), help="folder for <name>.npz feature files"),
) -> None:
    """Extract DELF features of images into compact .npz files: ``<stem>.npz``, or
    ``<stem>-<hash of the path>.npz`` when inputs share a stem; never over another image's file."""
    from delf_es.features import Extractor
    from delf_es.imageio import load_image
    from delf_es.degenerate import drop_flat_keypoints
    from delf_es.outputs import feature_file_names, prepare_output_folder, write_features

    settings = State.checked()
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


@app.command()
def match(
    image_a: str = typer.Argument(...),
    image_b: str = typer.Argument(...),
    out: Path = typer.Option(Path("match.png"), help="figure of the verified correspondences"),
    model: Optional[str] = typer.Option(None, help="homography (default), fundamental or affine"),
) -> None:
    """Match two images, verify geometrically and draw the inlier correspondences."""
    try:
        result = run_match(image_a, image_b, out, State.checked(**({"ransac_model": model} if model is not None else {})))
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


@app.command("fit-pca")
def fit_pca_command(
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

    settings = State.checked(use_pca=False, max_feature_num=max_per_image)
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
    except ValueError as error:
        fail(error)
    artifact.save(out)
    kept = float(artifact.explained_variance.sum())
    console.print(f"PCA {artifact.id}: {len(descriptors)} descriptors from {used} images, variance kept {kept:.3f} -> "
                  f"{escape(str(out))}")


@app.command()
def attention(
    image: str = typer.Argument(..., help="image file"),
    out: Path = typer.Option(Path("attention.png"), help="figure: the score map over the image + selected keypoints"),
    scale: float = typer.Option(1.0, min=1e-3, help="pyramid scale whose score map is drawn (> 0)"),
) -> None:
    """Show what the model looks at: keypoint scores (the attention head, or descriptor norms
    under norm scoring) over the image and the keypoints extraction keeps."""
    from delf_es.attention_map import draw_attention, score_map
    from delf_es.features import Extractor
    from delf_es.imageio import load_image

    settings = State.checked()
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


def engine(model: bool = True):
    from delf_es.sdk import DelfEs

    return DelfEs(State.checked(model=model, index=True))


@app.command()
def index(
    inputs: list[str] = typer.Argument(..., help="image files, folders, URLs or @list.txt"),
    metadata: Optional[str] = typer.Option(None, help="JSON object stored with every image"),
    reindex: bool = typer.Option(False, "--reindex", help="re-extract images that are already indexed"),
) -> None:
    """Index images (resumable: ids already in the index are skipped).  Work is committed every
    image or second (DELF_ES_COMMIT_SECONDS); Ctrl-C saves what is extracted and says how much."""
    import signal

    from delf_es.errors import Interrupted
    from delf_es.sdk import _check_metadata
    from delf_es.validation import parse_json_object

    try:
        extra = _check_metadata(parse_json_object(metadata, "--metadata"))
    except DelfEsError as error:
        fail(error)
    paths = expand_inputs(inputs)
    # SIGTERM (a service manager, `kill`) gets the same orderly stop as Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with engine() as sdk:
        try:
            report = sdk.bulk_add([(p, extra) if extra else p for p in paths], skip_existing=not reindex)
        except Interrupted as stop:  # before DelfEsError: it is one too
            saved = len(stop.report.succeeded)
            console.print(f"[red]interrupted:[/red] {saved} image(s) saved in this run, "
                          f"{sdk.count()} in the index; run the same command again to continue")
            raise typer.Exit(code=130) from None
        except DelfEsError as error:
            fail(error)
        for failure in report.failed:
            console.print(f"[yellow]failed[/yellow] {escape(failure.item_id)}: {escape(failure.error)}")
        skipped = len(paths) - len(report.succeeded) - len(report.failed)
        console.print(f"{len(report.succeeded)} indexed, {skipped} already there, {len(report.failed)} failed; "
                      f"{sdk.count()} images in the index")
    if report.failed:
        raise typer.Exit(code=1)


@app.command()
def search(
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

    settings = State.checked(index=True)
    try:
        metadata_filter = parse_json_object(pre_filter, "--filter", '{"term": {"metadata.city": "paris"}}')
        if metadata_filter is not None and not settings.es_url:  # checked now, not after extraction
            from delf_es.index.filters import compile_filter

            compile_filter(metadata_filter)
        if show is not None:
            from delf_es.outputs import prepare_output_folder

            prepare_output_folder(show.parent if str(show.parent) else Path("."))
    except DelfEsError as error:
        fail(error)
    with engine() as sdk:
        try:
            hits = sdk.search_image(image, all_orientations=all_orientations, limit=limit, pre_filter=metadata_filter)
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
                figure, missing = draw_search(sdk, image, hits, show)
            except DelfEsError as error:
                fail(error)
            for hit_id, reason in missing:
                console.print(f"[yellow]not drawn[/yellow] {escape(hit_id)}: {escape(reason)}")
            console.print(f"figure: {escape(str(figure))}")


def draw_search(sdk, query_path: str, hits: list[dict], out: Path, top: int = 3) -> tuple[Path, list[tuple[str, str]]]:
    """Query beside each of its top hits, verified correspondences drawn, stacked vertically.
    Hits whose image file is missing, moved or unreadable are left out: returns the figure and
    ``[(hit id, why)]`` for those."""
    from PIL import Image

    from delf_es.draw import draw_matches, stack_vertically
    from delf_es.verify import verify

    _, query = sdk.load(query_path, None, False)
    query_features = sdk.extract(query.pixels, "<query>")
    panels, missing = [], []
    for hit in hits[:top]:
        try:
            _, image = sdk.load(hit["path"], None, False)
        except DelfEsError as error:
            missing.append((hit["id"], str(error)))
            continue
        features = sdk.extract(image.pixels, hit["id"])
        panel = out.with_suffix(f".{len(panels)}.png")
        draw_matches(query.pixels, image.pixels, query_features.keypoints, features.keypoints,
                     verify(query_features, features, sdk.settings), panel)
        with Image.open(panel) as drawn:
            panels.append(drawn.convert("RGB"))
        panel.unlink()
    if not panels:
        panels = [Image.fromarray(query.pixels)]
    return stack_vertically(panels, out), missing


@app.command()
def delete(image_id: str = typer.Argument(...)) -> None:
    """Remove an image from the index."""
    with engine() as sdk:
        try:
            sdk.delete_image(image_id, refresh_after=True)
        except DelfEsError as error:
            fail(error)
    console.print(f"deleted {escape(image_id)}")


@app.command()
def stats() -> None:
    """Index size and the model that produced it."""
    with engine() as sdk:
        try:
            info = {"backend": type(sdk.backend).__name__, "images": sdk.count(), "model_id": sdk.model_id,
                    "index": sdk.settings.es_url or str(sdk.settings.data_dir / sdk.settings.index_alias)}
        except DelfEsError as error:
            fail(error)
    print(json.dumps(info, indent=2))


@app.command("eval")
def eval_command(
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
                                        "or descriptor projection is scored without re-running the backbone"),
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
        extra["es_url"] = es_url or State.checked(model=False).es_url
        if not extra["es_url"]:
            fail(ValueError("--backend elasticsearch needs --es-url or DELF_ES_ES_URL"))
    elif backend == "embedded":
        extra["es_url"] = None
    else:
        fail(ValueError("--backend is embedded or elasticsearch"))
    settings = State.checked(**extra)
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


@app.command()
def demo(out: Path = typer.Option(Path("out"), help="folder for the demo's index and figures")) -> None:
    """The main job on bundled photos, no server needed: index scikit-image's sample photos into an
    embedded index, search with another view of one of them, draw the verified matches."""
    from delf_es.sdk import DelfEs
    from delf_es.samples import database_photos, sample_pair

    out.mkdir(parents=True, exist_ok=True)
    settings = State.checked(index=True, es_url=None, redis_url=None, data_dir=out / "index")
    _, query = sample_pair()
    try:
        with DelfEs(settings) as sdk:
            report = sdk.bulk_add([str(p) for p in database_photos()], skip_existing=True)
            hits = sdk.search_image(str(query), limit=5)
            figure, _ = draw_search(sdk, str(query), hits, out / "demo_search.png", top=1)
            count = sdk.count()
    except DelfEsError as error:
        fail(error)
    console.print(f"indexed {len(report.succeeded)} new photos ({count} in {escape(str(settings.data_dir))}); "
                  f"query {query.name}:")
    for rank, hit in enumerate(hits, 1):
        console.print(f"  {rank}. {escape(Path(hit['id']).name)}  inliers={hit['inliers']}  votes={hit['votes']}")
    console.print(f"figure: {escape(str(figure))}")
    print(json.dumps({"query": str(query), "hits": [{k: h[k] for k in ("id", "inliers", "dist")} for h in hits],
                      "figure": str(figure)}))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on; beyond loopback only with DELF_ES_API_TOKEN"),
    port: int = typer.Option(8080, help="TCP port"),
    workers: int = typer.Option(1, help="processes (more than 1 needs Elasticsearch)"),
) -> None:
    """HTTP search server and web page (docs/api.md); OpenAPI at /docs."""
    from delf_es.api.serve import serve as run

    try:
        run(State.settings(), host=host, port=port, workers=workers, overrides=State.overrides)
    except DelfEsError as error:
        fail(error)


def _register_operations() -> None:
    """Worker fleet and operations commands (workers/cli.py); absent if the package is not installed."""
    try:
        from workers.cli import register
    except ImportError:  # pragma: no cover - e.g. installed without the workers package
        return
    register(app)


_register_operations()

if __name__ == "__main__":  # pragma: no cover
    app()
