"""Where the network runs: PyTorch, OpenVINO or ONNX Runtime, and at which precision.

``Settings.runtime`` ("auto", "torch", "openvino", "onnxruntime") and ``Settings.precision``
("auto", "float32", "bfloat16", "float16", "int8") are resolved once per process by
:func:`choose_runtime` into a :class:`RuntimeChoice`; :func:`build_network` turns it into a
:class:`LevelNetwork`, the one object :class:`delf_es.features.Extractor` runs pyramid
levels through.  All of them compute the same function (``DelfModel.forward_levels``):

- ``torch``: the PyTorch model (CPU: channels-last, optional ``torch.compile``; bfloat16
  weights on CPU; float16/bfloat16 autocast on CUDA).
- ``openvino``: the same graph converted locally, at first use, from the shipped PyTorch
  weights (``ov.convert_model``), cached under ``data_dir/models``; FP32, or INT8 after
  NNCF post-training quantisation calibrated on the project's training photos (never on
  evaluation images).  Nothing is downloaded.
- ``onnxruntime``: the same graph exported with ``torch.onnx.export``, cached likewise.

FP32 conversions change features only by float rounding, so they keep the model id; INT8
changes them beyond rounding, so :func:`model_id_suffix` adds ``+int8-<calibration digest>``
to the model id and caches/indexes never mix the two.  Measurements behind the "auto"
choice: benchmarks/extract_speed.py, docs/extraction.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from delf_es.errors import RuntimeUnavailable
from delf_es.model.calibration import calibration_digest, training_photos  # noqa: F401 - training_photos re-exported
from delf_es.model.delf import DelfModel, LevelOutput
from delf_es.model.pooling import gem, l2n

log = logging.getLogger(__name__)

#: bump when LevelGraph or the conversion changes, so cached converted models are rebuilt
GRAPH_VERSION = 1

#: CPU flags (as in /proc/cpuinfo) that decide what can run fast
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: native bfloat16 arithmetic (else bfloat16 is emulated: slower than float32)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

#: what "auto" picks on a CPU, best first (measured: docs/extraction.md); each entry is
#: (runtime, precision) and is skipped when its package or instructions are missing
AUTO_CPU_ORDER: tuple[tuple[str, str], ...] = (("openvino", "float32"), ("onnxruntime", "float32"), ("torch", "float32"))

#: the packages each runtime/precision needs
PACKAGES: dict[tuple[str, str], tuple[str, ...]] = {
    ("openvino", "float32"): ("openvino",),
    ("openvino", "bfloat16"): ("openvino",),
    ("openvino", "int8"): ("openvino", "nncf"),
    ("onnxruntime", "float32"): ("onnxruntime", "onnx"),
}


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class RuntimeChoice:
    """What runs the network.

    Attributes:
        runtime: "torch", "openvino" or "onnxruntime".
        precision: "float32", "bfloat16", "float16" or "int8".
        reason: one line on why (what was asked, what was detected, any fallback).
    """

    runtime: str
    precision: str
    reason: str

    @property
    def name(self) -> str:
        return f"{self.runtime}/{self.precision}"


#: the precisions each runtime offers on CPU
OFFERS: dict[str, tuple[str, ...]] = {
    "openvino": ("float32", "bfloat16", "int8"),
    "onnxruntime": ("float32",),
    "torch": ("float32", "bfloat16"),
}


def _missing(runtime: str, precision: str, is_installed: Callable[[str], bool]) -> list[str]:
    return [p for p in PACKAGES.get((runtime, precision), ()) if not is_installed(p)]


def _cannot_run(runtime: str, precision: str, flags: frozenset[str], native_bf16: bool,
                is_installed: Callable[[str], bool]) -> str:
    """Why ``runtime/precision`` cannot be auto-chosen here ("" if it can)."""
    missing = _missing(runtime, precision, is_installed)
    if missing:
        return f"not installed: {', '.join(missing)}"
    if precision == "int8" and "avx2" not in flags:
        return "no avx2"
    if runtime == "openvino" and precision == "bfloat16" and not native_bf16:
        return "no native bf16 (OpenVINO would run f32)"
    return ""


def choose_runtime(
    runtime: str, precision: str, device_type: str, flags: frozenset[str] | None = None,
    is_installed: Callable[[str], bool] = installed,
) -> RuntimeChoice:
    """Resolve the settings' runtime and precision for ``device_type`` ("cpu", "cuda", ...).

    "auto" falls back down :data:`AUTO_CPU_ORDER` when a package is missing (logged);
    an explicit runtime or precision that cannot run raises :class:`RuntimeUnavailable`,
    except bfloat16 on a CPU without native bf16, which is honoured (it runs, emulated)
    with a warning when asked for explicitly and never chosen by "auto".
    """
    flags = cpu_flags() if flags is None else flags
    detected = ",".join(f for f in FLAGS_OF_INTEREST if f in flags) or "none"
    if device_type != "cpu":
        if runtime not in ("auto", "torch"):
            raise RuntimeUnavailable(f"only the torch runtime runs on device {device_type!r}", f"{runtime}/{precision}")
        if precision == "int8":
            raise RuntimeUnavailable(f"int8 runs on CPU (OpenVINO) only, not on {device_type!r}", f"torch/{precision}")
        chosen = "float32" if precision == "auto" else precision
        return RuntimeChoice("torch", chosen, f"device {device_type}: torch, {chosen} (autocast when not float32)")
    if precision == "float16":
        raise RuntimeUnavailable("float16 is for CUDA autocast; on CPU use float32, bfloat16 or int8", f"{runtime}/float16")
    native_bf16 = any(f in flags for f in BF16_FLAGS)
    if runtime == "auto":
        if precision == "auto":
            candidates = list(AUTO_CPU_ORDER)
        else:  # an explicit precision: the first runtime that offers it
            candidates = [(r, precision) for r in ("openvino", "onnxruntime", "torch") if precision in OFFERS[r]]
        skipped = []
        for candidate_runtime, candidate_precision in candidates:
            reason = _cannot_run(candidate_runtime, candidate_precision, flags, native_bf16, is_installed)
            if reason:
                skipped.append(f"{candidate_runtime}/{candidate_precision} ({reason})")
                continue
            if candidate_precision == "bfloat16" and not native_bf16:
                log.warning("bfloat16 on a CPU without native bf16 (flags: %s): emulated, slower than float32", detected)
            note = f"; skipped {'; '.join(skipped)}" if skipped else ""
            return RuntimeChoice(candidate_runtime, candidate_precision, f"auto on CPU (flags: {detected}){note}")
        raise RuntimeUnavailable(f"nothing can run {precision} here: {'; '.join(skipped)}", f"auto/{precision}")
    chosen = "float32" if precision == "auto" else precision
    if runtime == "torch" and chosen == "int8":
        raise RuntimeUnavailable("int8 needs runtime openvino (NNCF post-training quantisation)", "torch/int8")
    if runtime == "onnxruntime" and chosen != "float32":
        raise RuntimeUnavailable("the onnxruntime runtime runs float32 only", f"onnxruntime/{chosen}")
    missing = _missing(runtime, chosen, is_installed)
    if missing:
        raise RuntimeUnavailable(f"not installed: {', '.join(missing)} (pip install {' '.join(missing)})", f"{runtime}/{chosen}")
    if chosen == "int8" and "avx2" not in flags:
        raise RuntimeUnavailable(f"int8 needs at least AVX2 (detected: {detected})", f"{runtime}/int8")
    if chosen == "bfloat16" and not native_bf16:
        if runtime == "openvino":
            raise RuntimeUnavailable(f"OpenVINO runs bf16 only on CPUs with native bf16 (detected: {detected})", "openvino/bfloat16")
        log.warning("bfloat16 on a CPU without native bf16 (flags: %s): emulated, slower than float32", detected)
    return RuntimeChoice(runtime, chosen, f"asked for {runtime}/{precision} (flags: {detected})")


# --------------------------------------------------------------------------- the graph


class LevelGraph(nn.Module):
    """``DelfModel.forward_levels`` as a plain tensor function, for export and compile.

    Input (B, 3, H, W) float32 normalised levels, H and W multiples of 32.  Output
    (local (B, C, H/16, W/16), scores (B, H/16, W/16)[, global (B, G) L2-normalised]).
    """

    def __init__(self, model: DelfModel, with_global: bool) -> None:
        super().__init__()
        self.model = model
        self.with_global = with_global

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.model.backbone(images, with_global=self.with_global)
        local = maps.local
        scores = self.model.attention(local)[:, 0] if self.model.attention is not None else local.norm(dim=1)
        if not self.with_global:
            return local, scores
        return local, scores, l2n(gem(maps.global_, self.model.gem_p))


def split_outputs(local: torch.Tensor, scores: torch.Tensor, global_: torch.Tensor | None) -> list[LevelOutput]:
    return [LevelOutput(local=local[b], scores=scores[b], global_=None if global_ is None else global_[b])
            for b in range(len(local))]


class LevelNetwork(Protocol):
    """Runs batches of same-size pyramid levels; what the Extractor calls."""

    choice: RuntimeChoice

    def forward_levels(self, images: torch.Tensor, with_global: bool) -> list[LevelOutput]:
        """Args: images (B, 3, H, W) float32 normalised, H and W multiples of 32."""
        ...

    def forward_level(self, image: torch.Tensor, with_global: bool) -> LevelOutput:
        ...


class TorchLevels:
    """The PyTorch model.  CPU: channels-last memory format (``channels_last``), bfloat16
    weights and activations when ``precision`` is bfloat16, optional ``torch.compile``.
    CUDA: float16/bfloat16 autocast (weights stay float32) when precision asks for it."""

    def __init__(self, model: DelfModel, device: torch.device, choice: RuntimeChoice, channels_last: bool = True,
                 compile: bool = False, cpu_autocast: bool = False) -> None:
        self.choice = choice
        self.device = device
        self.dtype = torch.float32
        self.autocast: torch.dtype | None = None
        low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(choice.precision)
        if low is not None and (device.type != "cpu" or cpu_autocast):
            self.autocast = low
        elif low is not None:
            self.dtype = low  # measured on CPU: bf16 weights beat autocast (its casts cost a pass each)
        self.model = model.to(device, self.dtype)
        self.channels_last = channels_last and device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._graphs: dict[bool, Callable] = {}
        if compile:
            self._graphs = {flag: torch.compile(LevelGraph(self.model, flag), dynamic=True) for flag in (False, True)}

    def forward_levels(self, images: torch.Tensor, with_global: bool) -> list[LevelOutput]:
        images = images.to(self.device, self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self._graphs:
                return split_outputs(*self._graphs[with_global](images), *(() if with_global else (None,)))
            return self.model.forward_levels(images, with_global)

    def forward_level(self, image: torch.Tensor, with_global: bool) -> LevelOutput:
        return self.forward_levels(image, with_global)[0]


class OpenVinoLevels:
    """An OpenVINO model compiled for the CPU: one compiled model with the global output
    and one without (the same graph with that output removed, so INT8 shares its
    quantisation).  Dynamic batch, height and width."""

    def __init__(self, full_model, choice: RuntimeChoice, threads: int) -> None:
        import openvino as ov

        self.choice = choice
        core = ov.Core()
        local_model = full_model.clone()
        local_model.remove_result(local_model.get_results()[2])
        local_model.validate_nodes_and_infer_types()
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            # pinning would put two 1-thread worker processes on the same core
            "ENABLE_CPU_PINNING": "NO",
            "INFERENCE_PRECISION_HINT": "bf16" if choice.precision == "bfloat16" else "f32",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self._requests = {
            flag: core.compile_model(model, "CPU", config).create_infer_request()
            for flag, model in ((True, full_model), (False, local_model))
        }

    def forward_levels(self, images: torch.Tensor, with_global: bool) -> list[LevelOutput]:
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        result = self._requests[with_global].infer({0: array})
        outputs = [torch.from_numpy(np.asarray(result[i])) for i in range(3 if with_global else 2)]
        return split_outputs(outputs[0], outputs[1], outputs[2] if with_global else None)

    def forward_level(self, image: torch.Tensor, with_global: bool) -> LevelOutput:
        return self.forward_levels(image, with_global)[0]


class OnnxLevels:
    """Two ONNX Runtime sessions (with and without the global output), CPU provider."""

    def __init__(self, paths: dict[bool, Path], choice: RuntimeChoice, threads: int) -> None:
        import onnxruntime as ort

        self.choice = choice
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._sessions = {flag: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                          for flag, path in paths.items()}

    def forward_levels(self, images: torch.Tensor, with_global: bool) -> list[LevelOutput]:
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        outputs = [torch.from_numpy(o) for o in self._sessions[with_global].run(None, {"images": array})]
        return split_outputs(outputs[0], outputs[1], outputs[2] if with_global else None)

    def forward_level(self, image: torch.Tensor, with_global: bool) -> LevelOutput:
        return self.forward_levels(image, with_global)[0]


# --------------------------------------------------------------------------- conversion

#: the size the graph is traced at; SAME padding is the same at every multiple of 32
TRACE_SIZE = (1, 3, 256, 320)


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary folder beside ``target`` and rename it into place, so two
    processes converting at once never read a half-written model (the loser's copy is dropped)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_openvino(model: DelfModel):
    """The FP32 OpenVINO model of ``LevelGraph(model, with_global=True)``, input (-1, 3, -1, -1)."""
    import openvino as ov

    graph = LevelGraph(model.float().to(memory_format=torch.contiguous_format), True).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns that SAME-padding sizes become constants: they are the same at every multiple of 32
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        converted = ov.convert_model(graph, example_input=torch.zeros(TRACE_SIZE),
                                     input=[ov.PartialShape([-1, 3, -1, -1])])
    converted.reshape({0: ov.PartialShape([-1, 3, -1, -1])})
    return converted


def quantize_openvino(fp32_model, calibration: Iterable[np.ndarray], subset_size: int):
    """INT8 by NNCF post-training quantisation (min/max ranges + fast bias correction).

    Args:
        calibration: re-iterable of (1, 3, H, W) float32 normalised levels of the
            training photos (never evaluation images).
        subset_size: levels used for the statistics.
    """
    import nncf

    return nncf.quantize(fp32_model, nncf.Dataset(calibration), subset_size=subset_size,
                         preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=True)


def export_onnx(model: DelfModel, folder: Path) -> dict[bool, Path]:
    """``LevelGraph`` with and without the global output as ONNX files (dynamic B, H, W)."""
    paths = {True: folder / "levels_global.onnx", False: folder / "levels_local.onnx"}
    model = model.float().to(memory_format=torch.contiguous_format)
    for flag, path in paths.items():
        outputs = ["local", "scores", "global"] if flag else ["local", "scores"]
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "local": {0: "batch", 2: "h16", 3: "w16"},
                "scores": {0: "batch", 1: "h16", 2: "w16"}}
        if flag:
            axes["global"] = {0: "batch"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constant SAME padding: see convert_openvino
            torch.onnx.export(LevelGraph(model, flag).eval(), (torch.zeros(TRACE_SIZE),), str(path), input_names=["images"],
                              output_names=outputs, dynamic_axes=axes, opset_version=17, dynamo=False)
    return paths


@dataclass(frozen=True)
class Calibration:
    """The photos INT8 is calibrated on and the pyramid levels made from them.

    Attributes:
        photos: image files (the training photos of scripts/training_images.sh).
        levels: () -> re-iterable of (1, 3, H, W) float32 normalised levels of those photos
            at every pyramid scale, made exactly as extraction makes them.
        count: number of levels ``levels`` yields.
    """

    photos: tuple[Path, ...]
    levels: Callable[[], Iterable[np.ndarray]]
    count: int

    def digest(self) -> str:
        """Content hash of the photos (and the quantiser's version): part of the INT8 model id."""
        return calibration_digest(self.photos)


def model_id_suffix(choice: RuntimeChoice, calibration_digest: str = "") -> str:
    """What the runtime adds to the model id: nothing for float runtimes (rounding only),
    ``+int8-<digest>`` for INT8 (features change beyond rounding)."""
    return f"+int8-{calibration_digest}" if choice.precision == "int8" else ""


def build_network(
    choice: RuntimeChoice, model: DelfModel, device: torch.device, *, cache_dir: Path, model_key: str,
    threads: int = 0, channels_last: bool = True, compile: bool = False,
    calibration: Callable[[], Calibration] | None = None,
) -> tuple[LevelNetwork, str]:
    """The network for ``choice`` and the model-id suffix it implies.

    Converted models are built here at first use from ``model`` (the shipped PyTorch weights)
    and cached as ``cache_dir/<model_key>-<runtime>-<precision>...``; ``model_key`` must name
    the weights (backbone, layer, digests) so another model never reads them.
    """
    if choice.runtime == "torch":
        return TorchLevels(model, device, choice, channels_last=channels_last, compile=compile), ""
    if choice.runtime == "onnxruntime":
        import onnxruntime

        folder = _atomic_dir(cache_dir / f"{model_key}-onnx-fp32-g{GRAPH_VERSION}-ort{onnxruntime.__version__}",
                             lambda scratch: export_onnx(model, scratch))
        paths = {True: folder / "levels_global.onnx", False: folder / "levels_local.onnx"}
        return OnnxLevels(paths, choice, threads), ""
    import openvino as ov

    version = ov.__version__.split("-")[0]
    fp32_dir = _atomic_dir(cache_dir / f"{model_key}-openvino-fp32-g{GRAPH_VERSION}-ov{version}",
                           lambda scratch: ov.save_model(convert_openvino(model), scratch / "levels.xml", compress_to_fp16=False))
    suffix, folder = "", fp32_dir
    if choice.precision == "int8":
        if calibration is None:
            raise RuntimeUnavailable("int8 needs calibration photos", choice.name)
        calib = calibration()
        digest = calib.digest()
        suffix = model_id_suffix(choice, digest)

        def quantize(scratch: Path) -> None:
            log.info("quantising to INT8 on %d levels of %d training photos (once; cached)", calib.count, len(calib.photos))
            quantized = quantize_openvino(ov.Core().read_model(fp32_dir / "levels.xml"), calib.levels(), calib.count)
            ov.save_model(quantized, scratch / "levels.xml", compress_to_fp16=False)

        folder = _atomic_dir(cache_dir / f"{model_key}-openvino-int8-{digest}-g{GRAPH_VERSION}-ov{version}", quantize)
    return OpenVinoLevels(ov.Core().read_model(folder / "levels.xml"), choice, threads), suffix
