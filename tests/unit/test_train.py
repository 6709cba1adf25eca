"""Training (issue 5) on a tiny real set: scikit-image photos shrunk to ~100 px, the real
EfficientNet-Lite0 backbone, a few epochs.  Seconds, not minutes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from delf_es.cli import app
from delf_es.model.delf import build_model
from delf_es.settings import Settings
from delf_es.train.attention_stage import AttentionConfig, train_attention
from delf_es.train.backbone_stage import BackboneConfig, train_backbone
from delf_es.train.checkpoint import read_log
from delf_es.train.data import BACKGROUND, gldv2_csv, image_folder, split_holdout
from delf_es.train.objective import loss_and_correct
from delf_es.train.view_cache import ViewConfig, build_view_cache

SETTINGS = Settings(backbone="efficientnet-lite0", scoring="norm")
VIEWS = ViewConfig(views_per_image=6, sizes=(64, 96), crop_range=(0.5, 1.0), holdout=0.3, seed=0)


def _save(array: np.ndarray, path, side: int = 112) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    image.thumbnail((side, side))
    image.save(path)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Three classes (one with two photos), one background texture."""
    from skimage import data

    root = tmp_path_factory.mktemp("tiny")
    _save(data.coffee(), root / "classes" / "coffee" / "coffee.png")
    _save(data.chelsea(), root / "classes" / "cat" / "chelsea.png")
    _save(np.ascontiguousarray(data.chelsea()[:, ::-1]), root / "classes" / "cat" / "chelsea_flipped.png")
    _save(data.astronaut(), root / "classes" / "astronaut" / "astronaut.png")
    _save(np.stack([data.brick()] * 3, axis=-1), root / "background" / "brick.png")
    return root


@pytest.fixture(scope="module")
def view_cache(tiny_set, tmp_path_factory):
    train_set = image_folder(tiny_set / "classes", tiny_set / "background")
    model, meta = build_model(SETTINGS)
    return build_view_cache(train_set, model, meta, VIEWS, tmp_path_factory.mktemp("views"), SETTINGS)


def test_image_folder_labels_and_background(tiny_set):
    train_set = image_folder(tiny_set / "classes", tiny_set / "background")
    assert train_set.classes == ("astronaut", "cat", "coffee")
    assert [i.label for i in train_set.items] == [0, 1, 1, 2, BACKGROUND]


def test_gldv2_csv_layout_skips_missing_files(tmp_path):
    from skimage import data

    ids = {"abc123": "7", "abd999": "7", "f00baa": "12", "e1e1e1": "12"}
    for image_id in list(ids)[:3]:  # the last one was not downloaded
        _save(data.coffee(), tmp_path / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", 40)
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "url", "landmark_id"])
        writer.writerows([i, "http://example.invalid", l] for i, l in ids.items())
    train_set = gldv2_csv(tmp_path / "train.csv", tmp_path / "train")
    assert train_set.classes == ("7", "12")
    assert sorted((i.path.stem, i.label) for i in train_set.items) == [("abc123", 0), ("abd999", 0), ("f00baa", 1)]


def test_holdout_keeps_a_training_image_per_class(tiny_set):
    train_set = image_folder(tiny_set / "classes", tiny_set / "background")
    held, view_level = split_holdout(train_set, 0.5, seed=1)
    assert len([p for p in held if p.parent.name == "cat"]) == 1  # 2 images: one held out, one kept
    assert view_level == {0, 2, BACKGROUND}  # single-image classes: held out by views


def test_background_negatives_have_a_uniform_target():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, correct, counted = loss_and_correct(logits, torch.tensor([0, BACKGROUND]), "negative")
    expected = (torch.log_softmax(logits[0], 0)[0].neg() + np.log(3)) / 2  # flat logits are the best a negative can do
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert (correct, counted) == (1, 1)
    _, correct, counted = loss_and_correct(logits, torch.tensor([0, BACKGROUND]), "class")
    assert counted == 2


def test_view_cache_splits_and_is_reused(view_cache, tiny_set, tmp_path):
    splits = {(r.path.split("/")[-1], r.split) for r in view_cache.records}
    assert {s for p, s in splits if p == "chelsea.png"} | {s for p, s in splits if p == "chelsea_flipped.png"} == {"train", "val"}
    sizes = {r.size for r in view_cache.records}
    assert sizes <= {64, 96} and view_cache.maps(64).shape[1:] == (view_cache.local_dim, 4, 4)
    again = build_view_cache(image_folder(tiny_set / "classes", tiny_set / "background"), None, build_model(SETTINGS)[1],
                             VIEWS, view_cache.folder.parent, SETTINGS)  # no model needed: reused from disk
    assert again.folder == view_cache.folder


def test_attention_training_lowers_loss_and_writes_a_loadable_head(view_cache, tmp_path):
    config = AttentionConfig(epochs=8, batch_size=8, lr=1e-2, hidden=16, seed=0)
    summary = train_attention(view_cache, config, tmp_path / "run")
    losses = [row["train_loss"] for row in summary["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(read_log(tmp_path / "run" / "log.csv")) == 8
    model, meta = build_model(SETTINGS.model_copy(update={"scoring": "attention", "attention_weights": tmp_path / "run" / "attention.pt"}))
    assert meta.scoring == "attention" and meta.attention_digest and model.attention.hidden == 16


def test_resume_continues_epochs_and_optimizer_state(view_cache, tmp_path):
    config = AttentionConfig(epochs=4, batch_size=8, lr=1e-2, hidden=16, seed=0)
    straight = train_attention(view_cache, config, tmp_path / "straight")
    train_attention(view_cache, config, tmp_path / "split", stop_after=2)  # an interrupted session
    first = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    resumed = train_attention(view_cache, config, tmp_path / "split", resume=True)
    last = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert first["epoch"] == 2 and last["epoch"] == 4 and [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    steps = [s["step"] for s in last["optimizer"]["state"].values()]
    assert all(float(s) == 2 * float(next(iter(first["optimizer"]["state"].values()))["step"]) for s in steps)
    assert [r["epoch"] for r in read_log(tmp_path / "split" / "log.csv")] == [1, 2, 3, 4]
    # same batches, same optimizer state: the interrupted run ends where the straight one does
    reference = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    for name, tensor in last["model"].items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=1e-4)


def test_backbone_stage_runs_and_exports_loadable_weights(tiny_set, tmp_path):
    train_set = image_folder(tiny_set / "classes", tiny_set / "background")
    config = BackboneConfig(epochs=2, batch_size=4, lr=1e-2, size=64, views_per_epoch=2, holdout=0.3)
    summary = train_backbone(train_set, SETTINGS, config, tmp_path / "stage1")
    assert summary["epochs"] == 2 and all(np.isfinite(r["train_loss"]) for r in summary["history"])
    resumed = train_backbone(train_set, SETTINGS, BackboneConfig(**{**config.__dict__, "epochs": 3}), tmp_path / "stage1", resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    tuned, meta = build_model(SETTINGS.model_copy(update={"backbone_weights": tmp_path / "stage1" / "backbone.pt"}))
    original, original_meta = build_model(SETTINGS)
    assert meta.backbone_digest != original_meta.backbone_digest  # the weights changed, and so does the model id
    image = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(tuned.backbone(image).local, original.backbone(image).local)


def test_train_cli_attention(tiny_set, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["--backbone", "efficientnet-lite0", "train", "attention", str(tiny_set / "classes"),
                                 "--background", str(tiny_set / "background"), "--out", str(tmp_path / "run"),
                                 "--epochs", "2", "--views", "3", "--sizes", "64", "--hidden", "8",
                                 "--cache", str(tmp_path / "views"), "--export", str(tmp_path / "head.pt")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["epochs"] == 2 and (tmp_path / "head.pt").is_file()
    bad = runner.invoke(app, ["train", "attention", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not found" in bad.output


SHIPPED_HEAD = Path(__file__).resolve().parents[2] / "delf_es" / "weights" / "attention-efficientnet-lite2-expand-instance.pt"


def test_shipped_head_loads_and_norm_stays_the_default(extractor):
    """The trained head ships, but measured no better than norm scoring, so 'auto' keeps norm."""
    from delf_es.model.weights import file_digest

    assert SHIPPED_HEAD.is_file(), "the trained head ships with the package"
    assert extractor.meta.scoring == "norm" and "-norm-" in extractor.model_id  # Settings() defaults: scoring 'auto'
    model, meta = build_model(Settings(scoring="attention", attention_weights=SHIPPED_HEAD))
    assert meta.scoring == "attention" and meta.attention_digest == file_digest(SHIPPED_HEAD)
    assert model.attention.hidden == 128 and "trained by delf-es" in meta.attention_provenance
    from delf_es.features import default_pca_path

    assert default_pca_path("efficientnet-lite2", "expand", "attention").is_file()  # PCA refitted on its keypoints


def test_attention_command_draws_the_score_map(tmp_path):
    from skimage import data

    image = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(image)
    result = CliRunner().invoke(app, ["--scales", "0.7071,1.0", "--scoring", "attention", "--attention-weights", str(SHIPPED_HEAD),
                                      "attention", str(image), "--out", str(tmp_path / "heat.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["scoring"] == "attention" and report["keypoints"] > 0
    assert report["score_map"] == [26, 38]  # 600x400 at scale 1 -> 608x416 level -> stride-16 cells
    assert Image.open(tmp_path / "heat.png").size[0] > 600
