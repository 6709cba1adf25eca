"""The model identity: one named, validated record of what turns pixels into features.

:class:`ModelSpec` is built from the Settings at each entry point (:meth:`ModelSpec.from_settings`),
crosses process boundaries as JSON (:meth:`to_json` / :meth:`from_json`: the reindexer's Celery
messages) and is the only place the model id string is built (:attr:`ModelSpec.model_id`).

Two kinds of fields:

* **identity** (in the model id): backbone + its weights' digest, local layer, scoring + the
  attention head's digest, the PCA / learned projection id, the INT8 calibration digest.
  Descriptors of two ids live in different spaces and must never meet: the id is in every
  index's ``_meta``, cache key and staging key.
* **sampling** (not in the id): ``scales``, ``global_scales``, ``max_image_size``,
  ``max_feature_num``, ``score_threshold`` and a float ``precision``.  They change which
  keypoints are kept (or float rounding), not the space the descriptors live in, so an index
  built with one pyramid is searchable with another.  They were never in the id, and adding them
  now would orphan every existing index and cache; the evaluation's feature cache names them on
  top of the id (:func:`delf_es.eval.feature_cache.cache_name`).

Construction validates and *resolves* (so two equal specs configure the same network): the
backbone must be registered, its layer offered, every named file present; ``local_layer`` is
resolved to the preset's choice and ``scoring`` to 'attention' or 'norm'; fields the resolved
model ignores are cleared (the head under 'norm' scoring, the PCA path without PCA, the
calibration list unless INT8).  ``None`` paths mean "the shipped default" and stay ``None``,
so the JSON form is valid on any machine with the same packages; other paths are made absolute
(a worker runs in another folder).  Errors are the typed,
one-line ones of :mod:`delf_es.errors`: UnknownBackbone, ConfigurationError (layer),
WeightsNotFound (a file), ModelMismatch (a PCA fitted for another layer), RuntimeUnavailable
(INT8 without calibration photos), InvalidSetting (a value of the wrong type or range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from delf_es.errors import ConfigurationError, InvalidSetting, ModelMismatch, WeightsNotFound
from delf_es.model.calibration import calibration_digest, training_photos
from delf_es.model.registry import BackbonePreset, get_preset
from delf_es.model.weights import default_attention_path, default_pca_path, file_digest
from delf_es.pca import PcaArtifact
from delf_es.settings import CHOICES, Settings

#: ``format`` of the JSON form; a reader refuses another (a message from a newer release)
SPEC_FORMAT = "delf-es-model/1"
#: paths: ``None`` = the shipped default
PATH_FIELDS = ("backbone_weights", "attention_weights", "pca_path", "int8_calibration")
SCALE_FIELDS = ("scales", "global_scales")
#: max_feature_num's bounds, as Settings has them
MAX_FEATURES = 1 << 20


def _default(name: str) -> Any:
    """The Settings default of ``name``: one source of defaults for both records."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


@dataclass(frozen=True)
class ModelSpec:
    """What defines extracted features (see the module docstring for which fields are in the id).

    Attributes:
        backbone: registry name (:data:`delf_es.model.registry.BACKBONES`).
        backbone_weights: state_dict file; None = the weights packaged for the backbone.
        local_layer: activation feeding the local descriptors (resolved: never None after construction).
        scoring: 'attention' or 'norm' after construction ('auto' resolves to 'attention' when a head exists).
        attention_weights: the head file; None = the shipped head of the backbone/layer.
        use_pca: reduce the local descriptors with a PCA / learned projection.
        pca_path: its artifact; None = the shipped one for the backbone/layer/scoring.
        precision: 'auto', 'float32', 'bfloat16', 'float16' or 'int8' (only INT8 is in the id).
        int8_calibration: INT8's calibration photos (a list file or a folder).
        scales: pyramid scales (unitless factors, sorted) of the local features.
        global_scales: pyramid scales pooled into the global descriptor.
        max_image_size: px, longer side before the pyramid.
        max_feature_num: keypoints kept per image.
        score_threshold: keypoints need a score above this.
    """

    backbone: str = _default("backbone")
    backbone_weights: Path | None = None
    local_layer: str | None = None
    scoring: str = _default("scoring")
    attention_weights: Path | None = None
    use_pca: bool = _default("use_pca")
    pca_path: Path | None = None
    precision: str = _default("precision")
    int8_calibration: Path | None = None
    scales: tuple[float, ...] = _default("scales")
    global_scales: tuple[float, ...] = _default("global_scales")
    max_image_size: int = _default("max_image_size")
    max_feature_num: int = _default("max_feature_num")
    score_threshold: float = _default("score_threshold")

    # resolved on construction (not part of equality: they follow from the fields above)
    _preset: BackbonePreset = field(init=False, repr=False, compare=False)
    _weights: Path = field(init=False, repr=False, compare=False)
    _attention: Path | None = field(init=False, repr=False, compare=False)
    _pca: PcaArtifact | None = field(init=False, repr=False, compare=False)
    _photos: tuple[Path, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_values()
        network = resolve_network(self)
        self._set(local_layer=network.local_layer, scoring=network.scoring, _preset=network.preset,
                  _weights=network.weights, _attention=network.attention)
        if network.scoring == "norm":
            self._set(attention_weights=None)
        pca = self._load_pca(network.preset, network.local_layer, network.scoring) if self.use_pca else None
        self._set(_pca=pca, **({} if self.use_pca else {"pca_path": None}))
        photos = training_photos(self.int8_calibration) if self.precision == "int8" else ()
        self._set(_photos=photos, **({} if self.precision == "int8" else {"int8_calibration": None}))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelSpec":
        """The spec the settings describe (their model and extraction fields)."""
        return cls(**{name: getattr(settings, name) for name in cls.field_names()})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields that are also Settings fields (every public one)."""
        return tuple(f.name for f in fields(cls) if f.init)

    def settings(self, base: Settings) -> Settings:
        """``base`` (a process's own settings: device, threads, services...) running this model."""
        return base.model_copy(update={name: getattr(self, name) for name in self.field_names()})

    # ------------------------------------------------------------------ identity

    @cached_property
    def model_id(self) -> str:
        """``<backbone>.<layer>-<scoring>-<reduction>@<backbone digest>[+int8-<calibration digest>]``,
        e.g. ``efficientnet-lite2.expand-norm-pca40-e9632f93@9656183e``: scoring is ``norm`` or
        ``attention-<head digest>``, the reduction the PCA's id (``pca40-<hash>``, ``proj40-<hash>``)
        or ``raw<D>``.  Float runtimes differ by rounding only and keep the id; INT8 changes the
        features beyond rounding, so it names its calibration set.  The only place the id is built:
        existing indexes and caches are keyed by it, so its form must never change
        (tests/unit/test_model_spec.py pins it)."""
        reduction = self._pca.id if self._pca is not None else f"raw{self.local_dim}"
        suffix = f"+int8-{calibration_digest(self._photos)}" if self.precision == "int8" else ""
        return f"{self.backbone}.{self.local_layer}-{self._scoring_id}-{reduction}@{self.backbone_digest}{suffix}"

    @property
    def network_key(self) -> str:
        """Names the network's weights (not the PCA): the file stem of converted networks
        (OpenVINO, ONNX) in ``model_cache_dir``."""
        return f"{self.backbone}.{self.local_layer}-{self._scoring_id}@{self.backbone_digest}"

    @property
    def _scoring_id(self) -> str:
        return f"attention-{self.attention_digest}" if self._attention is not None else "norm"

    @property
    def backbone_digest(self) -> str:
        return file_digest(self._weights)

    @property
    def attention_digest(self) -> str:
        """Hash of the head file; "" under norm scoring."""
        return file_digest(self._attention) if self._attention is not None else ""

    # ------------------------------------------------------------------ what the extractor loads

    @property
    def preset(self) -> BackbonePreset:
        return self._preset

    @property
    def weights_path(self) -> Path:
        """The backbone's weight file (packaged or given)."""
        return self._weights

    @property
    def attention_path(self) -> Path | None:
        """The attention head file, None under norm scoring."""
        return self._attention

    @property
    def pca(self) -> PcaArtifact | None:
        """The loaded PCA / projection (None without PCA)."""
        return self._pca

    @property
    def calibration_photos(self) -> tuple[Path, ...]:
        """INT8's calibration photos (empty unless INT8)."""
        return self._photos

    @property
    def local_dim(self) -> int:
        """Channels of the raw local descriptors (before PCA)."""
        return self._preset.local_dims[self.local_layer]

    @property
    def descriptor_dim(self) -> int:
        """Dimensions of the stored local descriptors (after PCA)."""
        return self._pca.dims if self._pca is not None else self.local_dim

    # ------------------------------------------------------------------ JSON form

    def to_json(self) -> dict[str, Any]:
        """JSON-able form: the fields (paths as str, scales as lists), ``format`` and the
        ``model_id`` the sender computed, which :meth:`from_json` checks."""
        out: dict[str, Any] = {"format": SPEC_FORMAT}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        out["model_id"] = self.model_id
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The spec of :meth:`to_json`'s output.

        Raises:
            InvalidSetting: not a spec of this format, or an unknown field.
            ModelMismatch: this process computes another model id from it than the sender did
                (its weight, head or PCA files differ): its features would not match the sender's.
            and whatever construction raises.
        """
        if not isinstance(data, Mapping) or data.get("format") != SPEC_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise InvalidSetting(f"not a model spec of format {SPEC_FORMAT} (got {got!r})", "model")
        values = {k: v for k, v in data.items() if k not in ("format", "model_id")}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise InvalidSetting(f"unknown model spec field(s) {unknown}", "model")
        spec = cls(**values)
        expected = data.get("model_id")
        if expected is not None and spec.model_id != expected:
            raise ModelMismatch(f"the model spec of {expected} gives {spec.model_id} here: "
                                "its weight, head or PCA files differ from the sender's")
        return spec

    # ------------------------------------------------------------------ checks

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: set once, during construction

    def _check_values(self) -> None:
        """Types and ranges (a JSON message is not checked by Settings); paths and scales normalised."""
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise InvalidSetting(f"a file path, got {value!r}", name)
            # absolute: the JSON form is read by workers running in another folder
            self._set(**{name: Path(value).expanduser().absolute()})
        for name in ("backbone", "scoring", "precision") + (("local_layer",) if self.local_layer is not None else ()):
            if not isinstance(getattr(self, name), str):
                raise InvalidSetting(f"a string, got {type(getattr(self, name)).__name__}", name)
        for name in ("scoring", "precision"):
            if getattr(self, name) not in CHOICES[name]:
                raise InvalidSetting(f"must be one of {list(CHOICES[name])}, got {getattr(self, name)!r}", name)
        if not isinstance(self.use_pca, bool):
            raise InvalidSetting(f"true or false, got {self.use_pca!r}", "use_pca")
        for name in SCALE_FIELDS:
            self._set(**{name: _scales(getattr(self, name), name)})
        _integer(self.max_image_size, "max_image_size", 1, None)
        _integer(self.max_feature_num, "max_feature_num", 1, MAX_FEATURES)
        threshold = self.score_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise InvalidSetting(f"a number >= 0, got {threshold!r}", "score_threshold")
        self._set(score_threshold=float(threshold))

    def _load_pca(self, preset: BackbonePreset, layer: str, scoring: str) -> PcaArtifact:
        """The named PCA, else the shipped one for the layer and scoring (a head's keypoints get
        the PCA refitted on them when one ships, else the norm one); fitted for this layer."""
        path = self.pca_path
        if path is None:
            path = default_pca_path(preset.name, layer, scoring)
            if not path.is_file() and scoring == "attention":
                path = default_pca_path(preset.name, layer, "norm")
            if not path.is_file():
                raise WeightsNotFound("no PCA for this backbone/layer: fit one with `delf-es fit-pca` or run with "
                                      "use_pca=False", str(path))
        pca = PcaArtifact.load(path)  # WeightsNotFound when missing or not a PCA file
        pca.check_compatible(preset.name, layer, preset.local_dims[layer])
        return pca


@dataclass(frozen=True)
class NetworkFiles:
    """The network part of a model, resolved: what :func:`delf_es.model.delf.build_model` loads.

    Attributes:
        preset: the backbone's registry entry.
        local_layer: the layer feeding the local descriptors.
        weights: the backbone's weight file.
        attention: the attention head file, None for norm scoring.
    """

    preset: BackbonePreset
    local_layer: str
    weights: Path
    attention: Path | None

    @property
    def scoring(self) -> str:
        return "attention" if self.attention is not None else "norm"


def resolve_network(source: Settings | ModelSpec) -> NetworkFiles:
    """Backbone, layer, weights and head of ``source`` (Settings or a ModelSpec: same field names).

    'auto' scoring takes the head when one exists; a head named explicitly must exist unless
    scoring is 'norm' (which ignores it).

    Raises:
        UnknownBackbone, ConfigurationError (layer), WeightsNotFound (weights or head).
    """
    preset = get_preset(source.backbone)
    layer = source.local_layer or preset.local_layer
    if layer not in preset.local_dims:
        raise ConfigurationError(f"backbone {preset.name} has no local layer {layer!r}; "
                                 f"choose from {sorted(preset.local_dims)}")
    weights = preset.weights_path(source.backbone_weights)
    attention = None
    if source.scoring != "norm":
        named = source.attention_weights
        path = Path(named) if named is not None else default_attention_path(preset.name, layer)
        if path.is_file():
            attention = path
        elif source.scoring == "attention" or named is not None:
            raise WeightsNotFound(f"scoring={source.scoring!r} but no attention head is available", str(path))
    return NetworkFiles(preset, layer, weights, attention)


def _scales(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidSetting(f"a list of positive numbers, got {value!r}", name)
    values = tuple(value)
    if not values or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                             for s in values):
        raise InvalidSetting(f"a non-empty list of positive numbers, got {list(values)!r}", name)
    return tuple(sorted(float(s) for s in values))


def _integer(value: Any, name: str, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise InvalidSetting(f"an integer {bounds}, got {value!r}", name)
