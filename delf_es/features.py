"""Image -> :class:`Features`.  The only module where tensors exist.

Pipeline (DELF, Noh et al. 2017; DELG, Cao et al. 2020):
resize so the longer side is at most ``max_image_size`` -> for each pyramid scale,
resize to a multiple of 32 px and run the network once -> score every cell of the
stride-16 map (attention head, or descriptor L2 norm until a head is trained) ->
keep cells scoring above ``score_threshold`` and the top ``max_feature_num`` over
all scales -> locate each at the centre of its receptive field in original-image
pixels -> descriptors L2 -> PCA -> L2.  The global descriptor is GeM over the
deeper map at ``global_scales``, L2-normalised per scale, summed, re-normalised.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from delf_es.errors import FeatureShapeError
from delf_es.model.delf import DelfModel, ModelMeta, build_model
from delf_es.model.receptive_field import ReceptiveField, level_size
from delf_es.model.runtime import Calibration, LevelNetwork, RuntimeChoice, build_network, choose_runtime
from delf_es.model.spec import ModelSpec
from delf_es.model.weights import default_pca_path  # noqa: F401 - re-exported (callers import it from here)
from delf_es.pca import PcaArtifact, l2_normalise
from delf_es.settings import Settings
from delf_es.types import Features

log = logging.getLogger(__name__)

#: every pyramid level is a multiple of this, so TF-'SAME' padding is the same at every level
LEVEL_MULTIPLE = 32


@dataclass(frozen=True)
class RawFeatures:
    """Selected keypoints before PCA (input of ``fit-pca``).

    Attributes:
        keypoints: (N, 2) float32 (x, y) px in the original image.
        scales: (N,) float32 pyramid scale of each keypoint.
        scores: (N,) float32 selection score.
        descriptors: (N, C) float32 L2-normalised raw descriptors.
        global_desc: (G,) float32 L2-normalised global descriptor.
        image_size: (width, height) of the original image, px.
    """

    keypoints: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    global_desc: np.ndarray
    image_size: tuple[int, int]


def check_pixels(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise FeatureShapeError("pixels", "(H, W, 3) uint8 RGB", got)


class Extractor:
    """Holds the network, its metadata and the PCA; ``extract`` turns pixels into Features."""

    def __init__(self, settings: Settings, spec: ModelSpec | None = None) -> None:
        """Args: settings (device, runtime, threads...); spec: the model, default
        ``ModelSpec.from_settings(settings)`` (whose fields then override the settings')."""
        self.spec: ModelSpec = spec or ModelSpec.from_settings(settings)
        settings = self.spec.settings(settings)
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = torch.device(settings.device)
        model, meta = build_model(self.spec)
        self.meta: ModelMeta = meta
        self.pca: PcaArtifact | None = self.spec.pca
        self._mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1)
        self.runtime: RuntimeChoice = choose_runtime(settings.runtime, settings.precision, self.device.type)
        log.info("network runtime %s: %s", self.runtime.name, self.runtime.reason)
        # INT8's calibration set is named in the model id (ModelSpec checked its photos); the
        # network itself is built (converted, compiled) at first use, so a process that only
        # needs the model id (the writer of a multi-process bulk index) never loads it
        self._calibration_set = self._calibration() if self.runtime.precision == "int8" else None
        self._network: LevelNetwork | None = None
        #: the PyTorch model (float32 unless the torch runtime casts it); ``network`` is what runs
        self.model: DelfModel = model

    @property
    def network(self) -> LevelNetwork:
        """What runs the pyramid levels (see :mod:`delf_es.model.runtime`), built at first use."""
        if self._network is None:
            settings = self.settings
            self._network, _ = build_network(
                self.runtime, self.model, self.device, cache_dir=Path(settings.model_cache_dir),
                model_key=self.spec.network_key, threads=settings.torch_threads, channels_last=settings.channels_last,
                compile=settings.torch_compile, calibration=lambda: self._calibration_set,
            )
        return self._network

    @network.setter
    def network(self, network: LevelNetwork) -> None:
        self._network = network

    def _calibration(self) -> Calibration:
        """INT8 calibration: every pyramid level of the training photos, made as extraction makes them."""
        photos = self.spec.calibration_photos
        scales = tuple(sorted(set(self.settings.scales) | set(self.settings.global_scales)))
        return Calibration(photos=photos, levels=lambda: _CalibrationLevels(self, photos, scales),
                           count=len(photos) * len(scales))

    @torch.inference_mode()
    def pyramid(self, pixels: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
        """(1, 3, H, W) float32 normalised levels of ``pixels`` at ``scales``, as extraction makes them."""
        check_pixels(pixels)
        base = self._base(pixels)
        sizes = [(level_size(base.shape[-2] * s, LEVEL_MULTIPLE), level_size(base.shape[-1] * s, LEVEL_MULTIPLE)) for s in scales]
        return [(_resize(base, h, w) - self._mean) / self._std for h, w in sizes]

    @property
    def model_id(self) -> str:
        """The spec's id (:attr:`delf_es.model.spec.ModelSpec.model_id`, the one place it is built)."""
        return self.spec.model_id

    @property
    def descriptor_dim(self) -> int:
        return self.spec.descriptor_dim

    def extract(self, pixels: np.ndarray, image_id: str) -> Features:
        """Args: pixels (H, W, 3) uint8 RGB, the original image after EXIF rotation."""
        return self._features(self.extract_raw(pixels), image_id)

    def extract_many(self, images: Sequence[tuple[np.ndarray, str]]) -> list[Features]:
        """Features of several ``(pixels, image_id)`` at once, in order: the same-size pyramid
        levels of different images run as one batch (up to ``extract_batch`` images), which is
        what keeps a GPU busy.  Each result equals ``extract`` of that image up to float
        rounding (batched kernels may sum in another order)."""
        raws = self.extract_raw_many([pixels for pixels, _ in images])
        return [self._features(raw, image_id) for raw, (_, image_id) in zip(raws, images)]

    def _features(self, raw: RawFeatures, image_id: str) -> Features:
        descriptors = raw.descriptors
        if self.pca is not None:
            descriptors = self.pca.transform(descriptors) if len(descriptors) else np.zeros((0, self.pca.dims), np.float32)
        return Features(
            image_id=image_id,
            model_id=self.model_id,
            image_size=raw.image_size,
            keypoints=raw.keypoints,
            scales=raw.scales,
            scores=raw.scores,
            descriptors=descriptors,
            global_desc=raw.global_desc,
        )

    def extract_raw(self, pixels: np.ndarray) -> RawFeatures:
        return self.extract_raw_many([pixels])[0]

    @torch.inference_mode()
    def extract_raw_many(self, images: Sequence[np.ndarray]) -> list[RawFeatures]:
        """:meth:`extract_raw` of each image; same-size levels batched (``extract_batch``)."""
        for pixels in images:
            check_pixels(pixels)
        settings = self.settings
        bases = [self._base(pixels) for pixels in images]
        levels = [_Levels() for _ in images]
        global_scales = {round(s, 4) for s in settings.global_scales}
        for scale in sorted(set(settings.scales) | set(settings.global_scales)):
            same_size: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, base in enumerate(bases):
                same_size[level_size(base.shape[-2] * scale, LEVEL_MULTIPLE), level_size(base.shape[-1] * scale, LEVEL_MULTIPLE)].append(i)
            for (level_h, level_w), members in same_size.items():
                for start in range(0, len(members), settings.extract_batch):
                    batch = members[start : start + settings.extract_batch]
                    level = torch.cat([_resize(bases[i], level_h, level_w) for i in batch])
                    level = (level - self._mean) / self._std
                    outputs = self.network.forward_levels(level, with_global=round(scale, 4) in global_scales)
                    for i, out in zip(batch, outputs):
                        height, width = images[i].shape[:2]
                        levels[i].add(out, scale, scale in settings.scales, (level_w, level_h), (width, height), self)
        return [acc.finish(pixels.shape[1], pixels.shape[0], self) for acc, pixels in zip(levels, images)]

    def _base(self, pixels: np.ndarray) -> torch.Tensor:
        """(1, 3, h, w) float image, the longer side capped at ``max_image_size``."""
        height, width = pixels.shape[:2]
        base = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(2, 0, 1)[None].float()
        longest = max(width, height)
        if longest > self.settings.max_image_size:
            ratio = self.settings.max_image_size / longest
            base = _resize(base, max(1, round(height * ratio)), max(1, round(width * ratio)))
        return base


@dataclass(frozen=True)
class _CalibrationLevels:
    """Re-iterable (NNCF passes over it more than once) of (1, 3, H, W) float32 normalised
    levels of ``photos`` at ``scales``, decoded one photo at a time to bound memory."""

    extractor: Extractor
    photos: tuple[Path, ...]
    scales: tuple[float, ...]

    def __iter__(self):
        from delf_es.imageio import load_image

        for path in self.photos:
            for level in self.extractor.pyramid(load_image(str(path), self.extractor.settings).pixels, self.scales):
                yield np.ascontiguousarray(level.cpu().float().numpy())


@dataclass
class _Levels:
    """Keypoint candidates of one image gathered over its pyramid levels."""

    locations: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    descriptors: list[torch.Tensor] = field(default_factory=list)
    global_sum: torch.Tensor | None = None

    def add(self, out, scale: float, local: bool, level_wh: tuple[int, int], image_wh: tuple[int, int],
            extractor: "Extractor") -> None:
        if out.global_ is not None:
            self.global_sum = out.global_.float() if self.global_sum is None else self.global_sum + out.global_.float()
        if not local:
            return
        keep = out.scores > extractor.settings.score_threshold
        rows, cols = torch.nonzero(keep, as_tuple=True)
        self.locations.append(cell_centres(rows, cols, extractor.meta.receptive_field, level_wh, image_wh))
        self.scores.append(out.scores[rows, cols].float())
        self.descriptors.append(out.local[:, rows, cols].T)
        self.scales.append(torch.full((len(rows),), scale, device=extractor.device))

    def finish(self, width: int, height: int, extractor: "Extractor") -> RawFeatures:
        all_scores = torch.cat(self.scores)
        order = torch.argsort(all_scores, descending=True, stable=True)[: extractor.settings.max_feature_num]
        keypoints = torch.cat(self.locations)[order].cpu().numpy().astype(np.float32)
        keypoints[:, 0] = np.clip(keypoints[:, 0], 0, width - 1)
        keypoints[:, 1] = np.clip(keypoints[:, 1], 0, height - 1)
        descriptors = torch.cat(self.descriptors)[order].float().cpu().numpy()
        global_desc = np.zeros(0, np.float32)
        if self.global_sum is not None:
            global_desc = l2_normalise(self.global_sum.float().cpu().numpy()[None])[0]
        return RawFeatures(
            keypoints=keypoints,
            scales=torch.cat(self.scales)[order].cpu().numpy().astype(np.float32),
            scores=all_scores[order].float().cpu().numpy().astype(np.float32),
            descriptors=l2_normalise(descriptors.reshape(-1, extractor.meta.local_dim)),
            global_desc=global_desc,
            image_size=(int(width), int(height)),
        )


def cell_centres(
    rows: torch.Tensor, cols: torch.Tensor, rf: ReceptiveField, level_size_wh: tuple[int, int], image_size_wh: tuple[int, int]
) -> torch.Tensor:
    """Centres of feature-map cells' receptive fields in original-image px.

    Args:
        rows, cols: (N,) integer cell indices in the local map of one pyramid level.
        rf: receptive field of the local map, in level px.
        level_size_wh: (width, height) of the level the network saw, px.
        image_size_wh: (width, height) of the original image, px.
    Returns:
        (N, 2) float32 (x, y), pixel centres at integer coordinates (so the
        +0.5 / -0.5 around the scaling maps pixel areas, not corners).
    """
    (level_w, level_h), (width, height) = level_size_wh, image_size_wh
    x = (rf.start + cols.float() * rf.jump + 0.5) * (width / level_w) - 0.5
    y = (rf.start + rows.float() * rf.jump + 0.5) * (height / level_h) - 0.5
    return torch.stack([x, y], dim=1)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (1, 3, H, W) float; antialiased when shrinking."""
    if image.shape[-2:] == (height, width):
        return image
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
