"""The model identity record (delf_es/model/spec.py): ids pinned, validation, JSON round trip.

The pinned ids were computed with ``Extractor(Settings(**config)).model_id`` on main before the
record existed (commit cc1e4b6): every index and cache in use is keyed by them, so they must
never change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from delf_es.errors import (ConfigurationError, DelfEsError, InvalidSetting, ModelMismatch, RuntimeUnavailable,
                            UnknownBackbone, WeightsNotFound)
from delf_es.model.registry import BACKBONES
from delf_es.model.spec import SPEC_FORMAT, ModelSpec
from delf_es.settings import Settings

WEIGHTS = Path(__file__).resolve().parents[2] / "delf_es" / "weights"

PINNED = {
    "default": ({}, "efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e"),
    "no-pca": ({"use_pca": False}, "efficientnet-lite2.expand-norm-raw720@9656183e"),
    "block": ({"local_layer": "block"}, "efficientnet-lite2.block-norm-pca40-ad11a4a8@9656183e"),
    "lite0": ({"backbone": "efficientnet-lite0"}, "efficientnet-lite0.expand-norm-pca40-8f42abf7@57934424"),
    "mobilenetv2": ({"backbone": "mobilenetv2"}, "mobilenetv2.expand-norm-pca40-d4925a18@2f518e77"),
    "mobilenetv2-raw": ({"backbone": "mobilenetv2", "use_pca": False}, "mobilenetv2.expand-norm-raw576@2f518e77"),
    "attention-instance": ({"attention_weights": WEIGHTS / "attention-efficientnet-lite2-expand-instance.pt"},
                           "efficientnet-lite2.expand-attention-72bdf0c4-pca40-3bbe007c@9656183e"),
    "attention-rank-proj": ({"attention_weights": WEIGHTS / "attention-efficientnet-lite2-expand-geometry-rank.pt",
                             "pca_path": WEIGHTS / "proj-efficientnet-lite2-expand-geometry-40.npz"},
                            "efficientnet-lite2.expand-attention-0edc031f-proj40-37638575@9656183e"),
    "pca128": ({"pca_path": WEIGHTS / "pca-efficientnet-lite2-expand-norm-128.npz"},
               "efficientnet-lite2.expand-norm-pca128-14062b6f@9656183e"),
    # sampling settings are not in the id (existing indexes stay searchable with another pyramid)
    "norm-scales-k500": ({"scoring": "norm", "scales": (0.5, 1.0), "max_feature_num": 500},
                         "efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e"),
}


@pytest.fixture()
def calibration(tmp_path) -> Path:
    """Two PPM photos with fixed bytes: the INT8 id pinned below was computed from them."""
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(2):
        pixels = (np.arange(48 * 64 * 3, dtype=np.uint32) * (i + 3) % 251).astype(np.uint8)
        (folder / f"photo{i}.ppm").write_bytes(b"P6\n64 48\n255\n" + pixels.tobytes())
    return folder


@pytest.mark.parametrize("name", sorted(PINNED))
def test_model_id_is_byte_identical_to_the_id_computed_before_the_record(name):
    config, expected = PINNED[name]
    assert ModelSpec.from_settings(Settings(**config)).model_id == expected
    assert ModelSpec(**config).model_id == expected


def test_int8_model_id_names_the_calibration_set_as_before(calibration):
    import nncf

    if nncf.__version__ != "3.4.0":  # the digest names the quantiser's version (pyproject pins 3.4.0)
        pytest.skip(f"pinned with nncf 3.4.0, installed {nncf.__version__}")
    spec = ModelSpec(precision="int8", int8_calibration=calibration)
    assert spec.model_id == "efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e+int8-6081e3fc"
    raw = ModelSpec(precision="int8", int8_calibration=str(calibration), use_pca=False)
    assert raw.model_id == "efficientnet-lite2.expand-norm-raw720@9656183e+int8-6081e3fc"
    assert ModelSpec(precision="bfloat16").model_id == PINNED["default"][1]  # float kinds: rounding only


def test_extractor_takes_its_model_id_from_the_spec():
    from delf_es.features import Extractor

    config, expected = PINNED["attention-instance"]
    extractor = Extractor(Settings(**config))
    assert extractor.model_id == expected and extractor.spec == ModelSpec(**config)
    assert extractor.meta.scoring == "attention" and extractor.pca.id == "pca40-3bbe007c"
    assert extractor.spec.network_key == "efficientnet-lite2.expand-attention-72bdf0c4@9656183e"


def test_registry_local_dims_match_the_built_backbones():
    """The table names raw<D> ids and checks PCAs before any network is built: it must agree."""
    for preset in BACKBONES.values():
        if preset.weights is None:
            continue  # resnet50: user-supplied weights (1024-d layer3, checked by test_features)
        for layer, dims in preset.local_dims.items():
            assert preset.build(preset.weights_path(None), layer).local_channels == dims, (preset.name, layer)


def test_default_spec_is_the_default_settings_spec_with_its_choices_resolved():
    spec = ModelSpec()
    assert spec == ModelSpec.from_settings(Settings())
    assert (spec.local_layer, spec.scoring) == ("expand", "norm")  # no shipped head for lite2/expand: norm
    assert spec.descriptor_dim == 40 and spec.local_dim == 720
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.backbone = "mobilenetv2"  # type: ignore[misc]
    assert len({spec, ModelSpec(scoring="norm"), ModelSpec(local_layer="expand")}) == 1  # hashable, same model


def test_fields_the_resolved_model_ignores_are_cleared_so_equal_specs_mean_equal_models():
    head = WEIGHTS / "attention-efficientnet-lite2-expand-instance.pt"
    assert ModelSpec(scoring="norm", attention_weights=head) == ModelSpec()
    assert ModelSpec(use_pca=False, pca_path=WEIGHTS / "pca-efficientnet-lite2-expand-norm-128.npz").pca_path is None
    assert ModelSpec(int8_calibration=Path("/nowhere")).int8_calibration is None  # float: no calibration


def test_settings_round_trip_keeps_the_process_fields_and_applies_the_model():
    base = Settings(device="cpu", torch_threads=1, ransac_px=7.0)
    spec = ModelSpec(backbone="mobilenetv2", scales=(1.0, 0.5), max_feature_num=300)
    applied = spec.settings(base)
    assert (applied.backbone, applied.scales, applied.max_feature_num) == ("mobilenetv2", (0.5, 1.0), 300)
    assert (applied.torch_threads, applied.ransac_px) == (1, 7.0)
    assert ModelSpec.from_settings(applied) == spec


@pytest.mark.parametrize("name", ["default", "attention-rank-proj", "no-pca", "norm-scales-k500"])
def test_json_round_trip_gives_an_equal_spec_with_the_same_id(name):
    spec = ModelSpec(**PINNED[name][0])
    data = json.loads(json.dumps(spec.to_json()))  # what a Celery message carries
    assert data["format"] == SPEC_FORMAT and data["model_id"] == spec.model_id
    again = ModelSpec.from_json(data)
    assert again == spec and again.model_id == spec.model_id


def test_json_whose_files_give_another_model_here_is_a_model_mismatch():
    data = ModelSpec().to_json()
    data["model_id"] = data["model_id"].replace("e9632f93", "00000000")  # the sender's PCA differed
    with pytest.raises(ModelMismatch, match="00000000"):
        ModelSpec.from_json(data)


@pytest.mark.parametrize("data, error", [
    ({"backbone": "mobilenetv2"}, InvalidSetting),                       # no format: not a spec
    ({"format": "delf-es-model/2"}, InvalidSetting),                     # a newer release's
    ({"format": SPEC_FORMAT, "device": "cuda"}, InvalidSetting),         # not a model field
    ({"format": SPEC_FORMAT, "scales": "0.5,1"}, InvalidSetting),
    ({"format": SPEC_FORMAT, "max_feature_num": 2.5}, InvalidSetting),
    ({"format": SPEC_FORMAT, "use_pca": "no"}, InvalidSetting),
    ({"format": SPEC_FORMAT, "pca_path": 3}, InvalidSetting),
    (["not", "a", "mapping"], InvalidSetting),
])
def test_malformed_json_is_refused_with_a_typed_error(data, error):
    with pytest.raises(error):
        ModelSpec.from_json(data)


@pytest.mark.parametrize("fields, error, words", [
    ({"backbone": "vgg16"}, UnknownBackbone, "unknown backbone 'vgg16'"),
    ({"local_layer": "layer9"}, ConfigurationError, "no local layer 'layer9'"),
    ({"backbone": "mobilenetv2", "local_layer": "depthwise"}, ConfigurationError, "choose from"),
    ({"backbone": "resnet50"}, WeightsNotFound, "no weight file given"),
    ({"backbone_weights": Path("/nowhere/w.pth")}, WeightsNotFound, "not found"),
    ({"scoring": "attention"}, WeightsNotFound, "no attention head"),
    ({"attention_weights": Path("/nowhere/head.pt")}, WeightsNotFound, "no attention head"),
    ({"pca_path": Path("/nowhere/pca.npz")}, WeightsNotFound, "PCA artifact not found"),
    ({"backbone": "efficientnet-lite0", "pca_path": WEIGHTS / "pca-efficientnet-lite2-expand-norm-40.npz"},
     ModelMismatch, "fitted for efficientnet-lite2/expand"),
    ({"local_layer": "depthwise"}, WeightsNotFound, "no PCA for this backbone/layer"),
    ({"precision": "int8"}, RuntimeUnavailable, "calibration photos"),
    ({"precision": "int8", "int8_calibration": Path("/nowhere/list.txt")}, RuntimeUnavailable, "does not exist"),
    ({"scoring": "best"}, InvalidSetting, "scoring"),
    ({"precision": "float8"}, InvalidSetting, "precision"),
    ({"scales": ()}, InvalidSetting, "scales"),
    ({"global_scales": (1.0, -1.0)}, InvalidSetting, "global_scales"),
    ({"max_feature_num": 0}, InvalidSetting, "max_feature_num"),
    ({"max_image_size": True}, InvalidSetting, "max_image_size"),
    ({"score_threshold": -0.5}, InvalidSetting, "score_threshold"),
])
def test_invalid_specs_raise_one_line_typed_errors_on_construction(fields, error, words):
    with pytest.raises(error) as raised:
        ModelSpec(**fields)
    assert isinstance(raised.value, DelfEsError)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_relative_paths_become_absolute_so_workers_in_another_folder_read_the_same_file(monkeypatch):
    monkeypatch.chdir(WEIGHTS.parent.parent)
    spec = ModelSpec(pca_path="delf_es/weights/pca-efficientnet-lite2-expand-norm-128.npz")
    assert spec.pca_path == WEIGHTS / "pca-efficientnet-lite2-expand-norm-128.npz"
    assert spec == ModelSpec(pca_path=WEIGHTS / "pca-efficientnet-lite2-expand-norm-128.npz")
    assert Path(spec.to_json()["pca_path"]).is_absolute()
