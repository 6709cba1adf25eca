"""Network runtimes: which one is chosen (and the fallback when a package or an instruction
is missing), and that the converted models compute what the PyTorch model computes.

Selection tests pass fake CPU flags and a fake "is installed" (said here: they are unit
tests of the decision, not of the packages); agreement tests run the real converted
models (OpenVINO, ONNX Runtime, NNCF INT8) on a real photo."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch

from delf_es.errors import DelfEsError, RuntimeUnavailable
from delf_es.model.runtime import AUTO_CPU_ORDER, choose_runtime, cpu_flags
from delf_es.settings import Settings

AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
SAPPHIRE = AVX2 | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
SMALL = dict(scales=(0.5, 1.0), global_scales=(1.0,), max_feature_num=400)


def everything(_package: str) -> bool:
    return True


def without(*absent: str):
    return lambda package: package not in absent


# --------------------------------------------------------------------------- selection


def test_auto_on_cpu_takes_the_fastest_measured_runtime_when_installed():
    choice = choose_runtime("auto", "auto", "cpu", AVX2, everything)
    assert (choice.runtime, choice.precision) == AUTO_CPU_ORDER[0]
    assert "avx2" in choice.reason  # the detected instructions are stated


def test_auto_falls_back_to_onnxruntime_then_torch_when_packages_are_missing():
    no_openvino = choose_runtime("auto", "auto", "cpu", AVX2, without("openvino"))
    assert no_openvino.runtime != "openvino" and "not installed: openvino" in no_openvino.reason
    neither = choose_runtime("auto", "auto", "cpu", AVX2, without("openvino", "onnxruntime"))
    assert (neither.runtime, neither.precision) == ("torch", "float32")
    assert "onnxruntime" in neither.reason


def test_explicit_runtime_that_is_not_installed_is_a_clear_error_that_pickles():
    with pytest.raises(RuntimeUnavailable, match="pip install openvino") as caught:
        choose_runtime("openvino", "auto", "cpu", AVX2, without("openvino"))
    assert isinstance(caught.value, DelfEsError)
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.runtime == "openvino/float32"


def test_int8_needs_nncf_and_avx2():
    assert choose_runtime("auto", "int8", "cpu", AVX2, everything).name == "openvino/int8"
    with pytest.raises(RuntimeUnavailable, match="nncf"):
        choose_runtime("openvino", "int8", "cpu", AVX2, without("nncf"))
    with pytest.raises(RuntimeUnavailable, match="AVX2"):
        choose_runtime("openvino", "int8", "cpu", frozenset({"sse4_2"}), everything)
    with pytest.raises(RuntimeUnavailable, match="nothing can run int8"):
        choose_runtime("auto", "int8", "cpu", frozenset({"sse4_2"}), everything)
    with pytest.raises(RuntimeUnavailable, match="openvino"):
        choose_runtime("torch", "int8", "cpu", AVX2, everything)


def test_bfloat16_goes_to_openvino_only_with_native_bf16(caplog):
    assert choose_runtime("auto", "bfloat16", "cpu", SAPPHIRE, everything).name == "openvino/bfloat16"
    with caplog.at_level(logging.WARNING):
        emulated = choose_runtime("auto", "bfloat16", "cpu", AVX2, everything)
    assert emulated.name == "torch/bfloat16" and "no native bf16" in emulated.reason
    assert "emulated" in caplog.text
    with pytest.raises(RuntimeUnavailable, match="native bf16"):
        choose_runtime("openvino", "bfloat16", "cpu", AVX2, everything)


def test_cuda_runs_torch_with_autocast_precisions_and_refuses_cpu_runtimes():
    assert choose_runtime("auto", "auto", "cuda", AVX2, everything).name == "torch/float32"
    assert choose_runtime("auto", "float16", "cuda", AVX2, everything).name == "torch/float16"
    assert choose_runtime("torch", "bfloat16", "cuda", AVX2, everything).name == "torch/bfloat16"
    with pytest.raises(RuntimeUnavailable):
        choose_runtime("openvino", "auto", "cuda", AVX2, everything)
    with pytest.raises(RuntimeUnavailable):
        choose_runtime("auto", "int8", "cuda", AVX2, everything)
    with pytest.raises(RuntimeUnavailable, match="CUDA"):
        choose_runtime("torch", "float16", "cpu", AVX2, everything)


def test_cpu_flags_are_read_from_this_machine():
    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    with open("/proc/cpuinfo") as handle:
        text = handle.read()
    if "flags" in text:
        assert flags and all(" " not in flag for flag in flags)


def test_unknown_runtime_and_precision_are_rejected_by_settings():
    with pytest.raises(ValueError, match="runtime must be"):
        Settings(runtime="tensorrt")
    with pytest.raises(ValueError, match="precision must be"):
        Settings(precision="int4")


# --------------------------------------------------------------------------- agreement


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def torch_features(models_dir):
    from skimage import data

    from delf_es.features import Extractor

    extractor = Extractor(Settings(runtime="torch", data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    return extractor, extractor.extract(np.ascontiguousarray(data.coffee()), "coffee")


def kept_share(a, b) -> float:
    """Share of b's keypoints (x, y, scale) that a kept too."""
    key = lambda f: {(round(x, 1), round(y, 1), s) for (x, y), s in zip(f.keypoints.tolist(), f.scales.tolist())}
    return len(key(a) & key(b)) / max(1, len(b.keypoints))


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_converted_float32_model_agrees_with_torch_and_keeps_the_model_id(runtime, models_dir, torch_features, photo):
    pytest.importorskip(runtime)
    from delf_es.features import Extractor

    reference_extractor, reference = torch_features
    extractor = Extractor(Settings(runtime=runtime, data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    assert extractor.runtime.name == f"{runtime}/float32"
    assert extractor.model_id == reference_extractor.model_id  # float rounding only
    got = extractor.extract(photo, "coffee")
    assert kept_share(got, reference) > 0.99
    np.testing.assert_allclose(got.keypoints, reference.keypoints, atol=1e-3)
    np.testing.assert_allclose(got.descriptors, reference.descriptors, atol=2e-3)
    assert float(got.global_desc @ reference.global_desc) > 0.99999
    assert list((models_dir / "models").iterdir())  # built locally, cached under model_cache_dir


def test_converted_model_is_built_once_and_then_read_from_the_cache(models_dir, monkeypatch, photo):
    pytest.importorskip("openvino")
    from delf_es.features import Extractor
    from delf_es.model import runtime

    Extractor(Settings(runtime="openvino", data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL)).network  # built (or already there)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(runtime, "convert_openvino", no_second_conversion)
    again = Extractor(Settings(runtime="openvino", data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    assert len(again.extract(photo, "coffee").keypoints) > 0


def test_batched_levels_through_openvino_match_one_at_a_time(models_dir, photo):
    pytest.importorskip("openvino")
    from delf_es.features import Extractor

    extractor = Extractor(Settings(runtime="openvino", data_dir=models_dir, model_cache_dir=models_dir / "models", extract_batch=2, **SMALL))
    flipped = np.ascontiguousarray(photo[:, ::-1])
    batched = extractor.extract_many([(photo, "a"), (flipped, "b")])
    for got, pixels in zip(batched, (photo, flipped)):
        one = extractor.extract(pixels, "x")
        np.testing.assert_allclose(got.descriptors, one.descriptors, atol=1e-4)


def test_int8_is_calibrated_on_the_given_photos_and_gets_its_own_model_id(models_dir, torch_features, tmp_path, photo):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from PIL import Image
    from skimage import data

    from delf_es.features import Extractor

    listing = tmp_path / "calibration.txt"
    paths = []
    for name in ("astronaut", "chelsea"):  # not the test photo (coffee)
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    listing.write_text("\n".join(map(str, paths)) + "\n")
    reference_extractor, reference = torch_features
    extractor = Extractor(Settings(runtime="openvino", precision="int8", int8_calibration=listing, data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    assert extractor.model_id.startswith(reference_extractor.model_id + "+int8-")
    got = extractor.extract(photo, "coffee")
    # INT8 changes features beyond rounding (hence the id) but keeps most keypoints and directions
    assert kept_share(got, reference) > 0.5
    same = {(round(x, 1), round(y, 1), s): i for i, ((x, y), s) in enumerate(zip(got.keypoints.tolist(), got.scales.tolist()))}
    cosines = [float(reference.descriptors[j] @ got.descriptors[same[key]])
               for j, key in enumerate((round(x, 1), round(y, 1), s) for (x, y), s in
                                       zip(reference.keypoints.tolist(), reference.scales.tolist())) if key in same]
    assert np.median(cosines) > 0.8

    listing.write_text(str(paths[0]) + "\n")  # another calibration set: another model id
    other = Extractor(Settings(runtime="openvino", precision="int8", int8_calibration=listing, data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    assert other.model_id != extractor.model_id


def test_int8_without_calibration_photos_is_a_clear_error(models_dir, tmp_path):
    pytest.importorskip("nncf")
    from delf_es.features import Extractor

    with pytest.raises(RuntimeUnavailable, match="calibration"):
        Extractor(Settings(runtime="openvino", precision="int8", data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    with pytest.raises(RuntimeUnavailable, match="missing"):
        listing = tmp_path / "list.txt"
        listing.write_text("/nonexistent/photo.jpg\n")
        Extractor(Settings(runtime="openvino", precision="int8", int8_calibration=listing, data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))


def test_cpu_bfloat16_stays_close_to_float32(models_dir, torch_features, photo):
    from delf_es.features import Extractor

    _, reference = torch_features
    extractor = Extractor(Settings(runtime="torch", precision="bfloat16", data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    got = extractor.extract(photo, "coffee")
    assert float(got.global_desc @ reference.global_desc) > 0.99
    assert kept_share(got, reference) > 0.7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU paths are tested above)")
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_cuda_autocast_agrees_with_cpu_float32(precision, models_dir, torch_features, photo):
    from delf_es.features import Extractor

    _, reference = torch_features
    extractor = Extractor(Settings(device="cuda", precision=precision, data_dir=models_dir, model_cache_dir=models_dir / "models", **SMALL))
    assert extractor.network.autocast is not None and next(extractor.model.parameters()).dtype == torch.float32
    got = extractor.extract(photo, "coffee")
    assert float(got.global_desc @ reference.global_desc) > 0.999
    assert kept_share(got, reference) > 0.8
