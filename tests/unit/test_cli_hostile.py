"""The CLI with hostile names and layouts (issue 15 items 2, 4, 5, 7), end to end on small real
images (typer's runner, same process; the embedded index in a temporary folder)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from delf_es.cli import app
from delf_es.types import Features

pytestmark = pytest.mark.timeout(300)
runner = CliRunner()
FAST = ["--backbone", "efficientnet-lite0", "--scales", "1.0"]


def _flat(text: str) -> str:
    """Output without whitespace: rich wraps long lines (paths) at the runner's 80 columns."""
    return "".join(text.split())


def _has(result, *phrases: str) -> bool:
    return all(_flat(p) in _flat(result.output) for p in phrases)


def _photo(path, seed=0, side=96):
    from skimage import data

    crop = data.astronaut()[seed * 40: seed * 40 + side, 100: 100 + side]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(crop)).save(path)
    return path


@pytest.fixture()
def index_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_ES_DATA_DIR", str(tmp_path / "index"))
    monkeypatch.delenv("DELF_ES_ES_URL", raising=False)
    monkeypatch.delenv("DELF_ES_REDIS_URL", raising=False)
    return tmp_path


def test_extract_of_two_files_with_one_stem_writes_two_files(tmp_path):
    a, b = _photo(tmp_path / "a" / "img.jpg", 0), _photo(tmp_path / "b" / "img.jpg", 1)
    out = tmp_path / "feats"
    result = runner.invoke(app, [*FAST, "extract", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert len(files) == 2 and _has(result, "2 extracted")
    assert {Features.load(f).image_id for f in files} == {str(a), str(b)}


def test_extract_never_overwrites_another_images_file(tmp_path):
    out = tmp_path / "feats"
    first = _photo(tmp_path / "a" / "img.jpg", 0)
    assert runner.invoke(app, [*FAST, "extract", str(first), "--out", str(out)]).exit_code == 0
    second = _photo(tmp_path / "b" / "img.jpg", 1)
    result = runner.invoke(app, [*FAST, "extract", str(second), "--out", str(out)])
    assert result.exit_code == 1 and _has(result, "not overwritten"), result.output
    assert Features.load(out / "img.npz").image_id == str(first)


def test_extract_out_naming_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    result = runner.invoke(app, [*FAST, "extract", str(_photo(tmp_path / "a.jpg")), "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and _has(result, "not a folder") and "Traceback" not in result.output


def test_file_names_are_printed_literally_and_markup_never_aborts_a_folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "[/x]" / "bad[").mkdir(parents=True)  # "[/" in a path aborted rich (MarkupError)
    (folder / "[/x]" / "bad[/b].jpg").write_bytes(b"not an image")
    (folder / "photo[red].jpg").write_bytes(b"not an image either")
    good = _photo(folder / "z[bold]good.png")
    result = runner.invoke(app, [*FAST, "extract", str(folder), "--out", str(tmp_path / "f")])
    assert result.exit_code == 1, result.output
    assert _has(result, "photo[red].jpg") and _has(result, "bad[/b].jpg")
    assert _has(result, "1 extracted") and _has(result, "2 failed")
    assert Features.load(tmp_path / "f" / "z[bold]good.npz").image_id == str(good)


def test_a_fifo_in_a_folder_fails_alone_and_does_not_hang_the_run(tmp_path, index_env):
    folder = tmp_path / "in"
    _photo(folder / "a.png")
    os.mkfifo(folder / "p.jpg")
    result = runner.invoke(app, [*FAST, "index", str(folder)])
    assert result.exit_code == 1 and _has(result, "named pipe"), result.output
    assert _has(result, "1 indexed")


def test_index_list_file_that_is_missing_is_a_one_line_error(tmp_path, index_env):
    result = runner.invoke(app, [*FAST, "index", f"@{tmp_path / 'missing.txt'}"])
    assert result.exit_code == 2 and _has(result, "not found") and "Traceback" not in result.output


def test_three_spellings_of_one_file_index_one_image(tmp_path, index_env, monkeypatch):
    _photo(tmp_path / "dir" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*FAST, "index", "dir/a.jpg", "./dir/a.jpg", str(tmp_path / "dir" / "a.jpg")])
    assert result.exit_code == 0, result.output
    assert _has(result, "1 images in the index"), result.output
    again = runner.invoke(app, [*FAST, "index", "./dir/../dir/a.jpg"])
    assert _has(again, "0 indexed, 1 already there") and _has(again, "1 images in the index"), again.output
    stats = json.loads(runner.invoke(app, [*FAST, "stats"]).stdout)
    assert stats["images"] == 1


def test_search_show_keeps_the_results_when_a_hit_file_is_missing(tmp_path, index_env):
    from skimage import data

    photo = tmp_path / "db" / "astronaut.png"
    photo.parent.mkdir()
    Image.fromarray(data.astronaut()[:256, :256]).save(photo)
    query = tmp_path / "query.png"
    Image.fromarray(data.astronaut()[16:240, 16:240]).save(query)
    assert runner.invoke(app, [*FAST, "index", str(photo)]).exit_code == 0
    photo.rename(tmp_path / "moved.png")  # the hit's file is gone
    figure = tmp_path / "figs" / "hits.png"
    result = runner.invoke(app, [*FAST, "search", str(query), "--show", str(figure)])
    assert result.exit_code == 0, result.output
    assert _has(result, "1 matches for") and _has(result, "astronaut.png")  # the table is printed
    assert _has(result, "not drawn") and _has(result, "file not found") and figure.exists()
