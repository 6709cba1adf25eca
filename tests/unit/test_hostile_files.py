"""Hostile files and paths (issue 15 items 2, 4, 5, 12): nothing blocks, nothing is grey-filled,
one file is one id, and no output overwrites another image's.  Real files, no mocks."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from delf_es.errors import ImageTooLarge, InvalidImage, OutputConflict, UnreadableFile
from delf_es.ids import content_id, file_image_id
from delf_es.imageio import load_image
from delf_es.inputs import expand_inputs
from delf_es.outputs import feature_file_names, prepare_output_folder, write_features
from delf_es.safe_files import read_regular_file
from delf_es.settings import Settings
from delf_es.types import Features

pytestmark = pytest.mark.timeout(30)  # a FIFO that is read blocks forever: the timeout fails the test


def _jpeg(width: int = 384, height: int = 288, progressive: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def _claim_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF header saying ``width x height``."""
    out = bytearray(data)
    i = 2
    while i < len(out):
        marker, length = out[i + 1], struct.unpack(">H", out[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        i += 2 + length
    raise AssertionError("no SOF marker")


@pytest.fixture()
def fifo(tmp_path):
    path = tmp_path / "p.jpg"
    os.mkfifo(path)
    return path


def test_a_named_pipe_is_refused_without_blocking(fifo):
    with pytest.raises(InvalidImage, match="named pipe"):
        load_image(str(fifo), Settings())
    with pytest.raises(UnreadableFile, match="named pipe"):
        read_regular_file(fifo, 1024)


@pytest.mark.parametrize("path, kind", [("/dev/zero", "character device"), ("/dev/null", "character device")])
def test_a_device_is_refused_without_reading(path, kind):
    with pytest.raises(InvalidImage, match=kind):
        load_image(path, Settings())


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(InvalidImage, match="directory"):
        load_image(str(tmp_path / "d.jpg"), Settings())


def test_a_file_over_the_size_cap_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg())
    with pytest.raises(InvalidImage, match="cap"):
        load_image(str(path), Settings(max_file_bytes=1000))
    assert load_image(str(path), Settings(max_file_bytes=len(path.read_bytes()))).size == (384, 288)


def test_a_name_too_long_is_a_typed_error(tmp_path):
    with pytest.raises(InvalidImage, match="too long"):
        load_image(str(tmp_path / ("x" * 300 + ".jpg")), Settings())


def test_a_fifo_in_a_folder_is_listed_then_refused_and_the_rest_loads(tmp_path, fifo):
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a symlink loop must not recurse forever
    found = expand_inputs([str(tmp_path)])
    assert found.sources == [str(tmp_path / "a.png"), str(fifo)]
    outcomes = []
    for source in found.sources:
        try:
            outcomes.append(load_image(source, Settings()).size)
        except InvalidImage as error:
            outcomes.append(type(error).__name__)
    assert outcomes == [(64, 64), "InvalidImage"]


def test_a_list_file_that_is_a_fifo_or_missing_is_a_typed_error(tmp_path, fifo):
    with pytest.raises(UnreadableFile, match="named pipe"):
        expand_inputs([f"@{fifo}"])
    with pytest.raises(UnreadableFile, match="not found"):
        expand_inputs([f"@{tmp_path / 'missing.txt'}"])
    (tmp_path / "list.txt").write_text("a.jpg\n\n b.jpg \n")
    assert expand_inputs([f"@{tmp_path / 'list.txt'}"]).sources == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_whose_header_claims_more_than_its_data_is_refused(tmp_path, progressive):
    liar = tmp_path / "liar.jpg"
    liar.write_bytes(_claim_size(_jpeg(progressive=progressive), 9000, 7000))
    with pytest.raises(InvalidImage, match="ends before the size its header claims"):
        load_image(str(liar), Settings())
    # smaller lies too (a bound on bytes per block would miss this one): 384 px of data, 2000 claimed
    liar.write_bytes(_claim_size(_jpeg(progressive=progressive), 2000, 1500))
    with pytest.raises(InvalidImage, match="ends before"):
        load_image(liar.read_bytes(), Settings())


@pytest.mark.parametrize("progressive", [False, True])
def test_complete_jpegs_still_decode(progressive):
    assert load_image(_jpeg(progressive=progressive), Settings()).size == (384, 288)


def test_a_truncated_jpeg_is_still_refused():
    with pytest.raises(InvalidImage):
        load_image(_jpeg()[:5000], Settings())


def test_a_bomb_header_is_still_refused_before_decoding():
    with pytest.raises(ImageTooLarge):
        load_image(_claim_size(_jpeg(), 60000, 60000), Settings())


def test_every_spelling_of_a_path_gives_one_id(tmp_path, monkeypatch):
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg())
    os.symlink(folder / "a.jpg", tmp_path / "link.jpg")
    monkeypatch.chdir(tmp_path)
    spellings = ["dir/a.jpg", "./dir/a.jpg", "dir//a.jpg", "dir/../dir/a.jpg", str(folder / "a.jpg"), "link.jpg"]
    ids = {file_image_id(s, "path", 1 << 20) for s in spellings}
    assert ids == {str(folder / "a.jpg")}


def test_content_ids_follow_the_bytes_not_the_name(tmp_path):
    data = _jpeg()
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "copy.jpg").write_bytes(data)
    ids = {file_image_id(str(tmp_path / n), "content", 1 << 20) for n in ("a.jpg", "copy.jpg")}
    assert ids == {content_id(data)} and content_id(data).startswith("sha256:") and len(content_id(data)) == 71
    assert file_image_id("https://example.org/a.jpg", "content", 1) == "https://example.org/a.jpg"


def test_inputs_sharing_a_stem_get_distinct_feature_files(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "img.jpg").write_bytes(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    names = feature_file_names([str(tmp_path / "a/img.jpg"), str(tmp_path / "b/img.jpg"), str(tmp_path / "c.jpg"),
                                str(tmp_path / "a/../a/img.jpg")])
    assert len(names) == 3 and names[str(tmp_path / "c.jpg")] == "c.npz"
    assert len(set(names.values())) == 3 and all(n.startswith("img-") for k, n in names.items() if "img" in k)
    # order does not change a name
    assert feature_file_names(list(reversed(list(names)))) == names


def _features(image_id: str) -> Features:
    return Features(image_id=image_id, model_id="m", image_size=(64, 64), keypoints=np.zeros((1, 2), np.float32),
                    scales=np.ones(1, np.float32), scores=np.ones(1, np.float32),
                    descriptors=np.eye(1, 4, dtype=np.float32), global_desc=np.eye(1, 4, dtype=np.float32)[0])


def test_a_feature_file_of_another_image_is_never_overwritten(tmp_path):
    target = tmp_path / "img.npz"
    write_features(_features("a/img.jpg"), target)
    write_features(_features("a/img.jpg"), target)  # a re-run of the same image replaces it
    with pytest.raises(OutputConflict, match="a/img.jpg"):
        write_features(_features("b/img.jpg"), target)
    assert Features.load(target).image_id == "a/img.jpg"
    (tmp_path / "notes.npz").write_text("mine")
    with pytest.raises(OutputConflict, match="not a delf-es feature file"):
        write_features(_features("c.jpg"), tmp_path / "notes.npz")
    assert (tmp_path / "notes.npz").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputConflict, match="not a folder"):
        prepare_output_folder(tmp_path / "out")
    with pytest.raises(OutputConflict, match="cannot create"):
        prepare_output_folder(tmp_path / "out" / "sub")
