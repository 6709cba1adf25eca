"""Generated hostile inputs (hypothesis): ids, metadata, filters, settings values, image bytes and
file names either work or raise a typed DelfEsError, never anything else and never hang.

No model and no services: these are the validation layers every entry point goes through."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

from delf_es.errors import DelfEsError, InvalidImage, InvalidRequest, InvalidSetting, UnreadableFile, UnsupportedFilter
from delf_es.imageio import load_image
from delf_es.index.filters import compile_filter
from delf_es.safe_files import read_regular_file
from delf_es.items import MAX_ID_BYTES
from delf_es.items import check_id as _check_id
from delf_es.items import check_metadata as _check_metadata
from delf_es.settings import Settings

pytestmark = pytest.mark.timeout(120)
FAST = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
anything = st.recursive(
    json_scalars | st.binary(max_size=8) | st.tuples(st.integers()) | st.sets(st.integers(), max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.text(max_size=700) | st.binary(max_size=20) | st.integers() | st.none())
def test_any_id_is_accepted_whole_or_refused_typed(name):
    try:
        checked = _check_id(name)
    except InvalidRequest:
        return
    assert checked == name and 1 <= len(checked.encode()) <= MAX_ID_BYTES


@FAST
@given(anything)
def test_any_metadata_is_stored_as_json_or_refused_typed(metadata):
    try:
        stored = _check_metadata(metadata)
    except InvalidRequest:
        return
    assert isinstance(stored, dict)
    assert json.loads(json.dumps(stored, allow_nan=False)) == stored  # plain JSON: no NaN, no tuples, no bytes



clause_names = st.sampled_from(["term", "terms", "range", "exists", "bool", "match_all", "match_none",
                                "wildcard", "script", "must", "filter", "gt", "value", "field", ""])
filters = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        clause_names | st.text(max_size=10).map(lambda t: "metadata." + t), children, max_size=3),
    max_leaves=10,
)


@FAST
@given(filters, st.dictionaries(st.text(max_size=5), json_scalars | st.lists(json_scalars, max_size=3), max_size=3))
def test_any_filter_compiles_to_a_predicate_or_is_refused_typed(metadata_filter, metadata):
    try:
        predicate = compile_filter(metadata_filter)
    except UnsupportedFilter:
        return
    assert predicate(metadata) in (True, False)


SETTINGS_FIELDS = sorted(Settings.model_fields)


@FAST
@given(st.sampled_from(SETTINGS_FIELDS), anything | st.text(max_size=30) | st.integers(-10**12, 10**12))
def test_any_settings_value_is_accepted_or_refused_by_validation(field, value):
    try:
        Settings(**{field: value})
    except InvalidSetting as error:  # one typed line, naming the field
        assert "\n" not in str(error) and error.field == field


def _png(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)).save(buffer, "JPEG")
    return buffer.getvalue()


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([_png(), _jpeg()]), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 2000))
def test_mutated_image_bytes_decode_or_raise_invalid_image(data, edits, cut):
    mutated = bytearray(data)
    for position, value in edits:
        if position < len(mutated):
            mutated[position] = value
    mutated = bytes(mutated[: max(0, len(mutated) - cut)] if cut < len(mutated) else mutated[:cut])
    try:
        image = load_image(mutated, Settings())
    except InvalidImage:
        return
    assert image.pixels.dtype == np.uint8 and image.pixels.shape[2] == 3


@FAST
@given(st.text(min_size=1, max_size=300))
def test_any_file_name_reads_or_raises_unreadable_file(name):
    try:
        read_regular_file(name, 1 << 16)
    except UnreadableFile:
        pass


@FAST
@given(st.text(max_size=50) | st.none(), st.integers(-5, 5))
def test_typed_errors_pickle_and_print_on_one_line(message, number):
    import pickle

    for error in (InvalidRequest(str(message)), UnreadableFile(str(message), "p"), UnsupportedFilter(str(message))):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and isinstance(again, DelfEsError)


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=200), anything)
def test_any_accepted_id_and_metadata_round_trip_through_the_embedded_index(tmp_path_factory, name, metadata):
    from delf_es.index.base import ImageRecord
    from delf_es.index.embedded import EmbeddedBackend
    from delf_es.types import Features

    try:
        image_id, stored = _check_id(name), _check_metadata(metadata if isinstance(metadata, dict) else {"v": metadata})
    except InvalidRequest:
        return
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(5, 8)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    features = Features(image_id=image_id, model_id="m@1", image_size=(64, 64), keypoints=np.zeros((5, 2), np.float32),
                        scales=np.ones(5, np.float32), scores=np.ones(5, np.float32), descriptors=descriptors,
                        global_desc=descriptors[0])
    with EmbeddedBackend(tmp_path_factory.mktemp("idx")) as backend:
        report = backend.upsert([ImageRecord(image_id, image_id, stored, features, "2026-12-01T00:00:00Z")])
        assert report.ok, report
        got = backend.get(image_id)
        assert got.image_id == image_id and got.metadata == stored and backend.existing([image_id]) == {image_id}
