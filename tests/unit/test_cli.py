"""The CLI end to end on real photos (typer's runner, same process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from delf_es.cli import app
from delf_es.types import Features

runner = CliRunner()
FAST = ["--backbone", "efficientnet-lite0", "--scales", "0.7071,1.0"]


@pytest.fixture()
def photos(tmp_path):
    from skimage import data

    good = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return good, corrupt, text


def test_extract_writes_features_and_reports_bad_files(photos, tmp_path):
    good, corrupt, text = photos
    out = tmp_path / "feats"
    result = runner.invoke(app, [*FAST, "extract", str(good), str(corrupt), str(text), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "corrupt" in result.output and "notes.png" in result.output
    feats = Features.load(out / "coffee.npz")
    assert feats.image_id == str(good) and feats.num_keypoints > 0 and feats.descriptor_dim == 40
    assert not (out / "corrupt.npz").exists()


def test_extract_a_folder_succeeds(tmp_path):
    from skimage import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "a.png")
    Image.fromarray(data.chelsea()).save(folder / "b.jpg")
    result = runner.invoke(app, [*FAST, "extract", str(folder), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a.npz", "b.npz"]


def test_match_draws_the_verified_correspondences(tmp_path):
    from delf_es.samples import sample_pair

    a, b = sample_pair()
    out = tmp_path / "m.png"
    result = runner.invoke(app, [*FAST, "match", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["inliers"] >= 20
    assert Image.open(out).size[0] > Image.open(a).size[0]


def test_match_with_a_non_image_is_a_clear_error(photos, tmp_path):
    good, _, text = photos
    result = runner.invoke(app, [*FAST, "match", str(good), str(text), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 2
    assert "error" in result.output and "notes.png" in result.output


def test_fit_pca_writes_a_loadable_artifact_with_provenance(tmp_path):
    from skimage import data

    from delf_es.pca import PcaArtifact

    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    out = tmp_path / "pca.npz"
    result = runner.invoke(app, [*FAST, "fit-pca", str(folder), "--out", str(out), "--dims", "16", "--fitted-on", "three skimage photos"])
    assert result.exit_code == 0, result.output
    pca = PcaArtifact.load(out)
    assert pca.dims == 16 and pca.provenance.backbone == "efficientnet-lite0"
    assert pca.provenance.fitted_on == "three skimage photos" and pca.provenance.num_images == 3
    # and the artifact is usable for extraction
    result = runner.invoke(app, [*FAST, "--pca", str(out), "extract", str(folder / "coffee.png"), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert Features.load(tmp_path / "f" / "coffee.npz").descriptor_dim == 16
    assert np.isfinite(Features.load(tmp_path / "f" / "coffee.npz").descriptors).all()


def test_demo_figure_draws_the_correspondences_the_search_verified(tmp_path, monkeypatch):
    """The figure shows what the search decided: the inliers drawn are the hit's own (the demo
    used to re-match for the figure and drew 429 inliers for a hit it printed with 474)."""
    import delf_es.draw

    drawn = []
    real = delf_es.draw.draw_matches

    def spy(image_a, image_b, keypoints_a, keypoints_b, correspondences, out_path, **kwargs):
        drawn.append((len(keypoints_a), len(keypoints_b), correspondences))
        return real(image_a, image_b, keypoints_a, keypoints_b, correspondences, out_path, **kwargs)

    monkeypatch.setattr(delf_es.draw, "draw_matches", spy)
    result = runner.invoke(app, [*FAST, "demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    top = summary["hits"][0]
    assert top["id"].endswith("motorcycle_left.png") and top["inliers"] > 0
    assert summary["figure_inliers"] == [top["inliers"]]
    ((query_keypoints, stored_keypoints, correspondences),) = drawn
    assert correspondences.num_inliers == top["inliers"]
    assert correspondences.matches[:, 0].max() < query_keypoints and correspondences.matches[:, 1].max() < stored_keypoints
    assert (tmp_path / "demo" / "demo_search.png").is_file()
