"""PCA for local descriptors: L2 -> PCA -> L2 (DELF's dimensionality reduction).

A fitted PCA is a versioned artifact: it records the backbone and layer whose
descriptors it reduces and what it was fitted on, and its id (a content hash) is
part of every model id, so descriptors reduced by different PCAs never mix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from delf_es.errors import FeatureShapeError, InvalidRequest, ModelMismatch, WeightsNotFound

PCA_FORMAT = "delf-es-pca/1"


@dataclass(frozen=True)
class PcaProvenance:
    """What a PCA was fitted for and on (free text for ``fitted_on``)."""

    backbone: str
    local_layer: str
    scoring: str
    fitted_on: str
    num_images: int
    num_descriptors: int
    command: str = ""
    #: "pca" (fitted PCA) or "proj" (a projection learned from geometry, delf_es.train.geometry_stage)
    method: str = "pca"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


@dataclass(frozen=True)
class PcaArtifact:
    """Attributes:
    mean: (D,) float32 mean of the L2-normalised training descriptors.
    components: (d, D) float32 principal axes, rows sorted by explained variance.
    explained_variance: (d,) float32 variance along each axis.
    provenance: what it was fitted for and on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    provenance: PcaProvenance

    def __post_init__(self) -> None:
        d, dim = self.components.shape
        if self.mean.shape != (dim,) or self.explained_variance.shape != (d,):
            raise FeatureShapeError("pca", f"mean ({dim},), variance ({d},)", f"{self.mean.shape}, {self.explained_variance.shape}")

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def id(self) -> str:
        """``<method><d>-<8 hex>`` (``pca40-...``, ``proj40-...``): a hash of the numbers, stable
        across save/load; the method says whether the axes were fitted (PCA) or learned."""
        digest = hashlib.sha256()
        for array in (self.mean, self.components):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return f"{self.provenance.method}{self.dims}-{digest.hexdigest()[:8]}"

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, D) L2-normalised descriptors -> (N, d) float32, L2-normalised."""
        if descriptors.ndim != 2 or descriptors.shape[1] != self.input_dim:
            raise FeatureShapeError("descriptors", f"(N, {self.input_dim})", str(descriptors.shape))
        reduced = (descriptors - self.mean) @ self.components.T
        return l2_normalise(reduced.astype(np.float32))

    def check_compatible(self, backbone: str, local_layer: str, input_dim: int) -> None:
        p = self.provenance
        if (p.backbone, p.local_layer, self.input_dim) != (backbone, local_layer, input_dim):
            raise ModelMismatch(
                f"PCA {self.id} was fitted for {p.backbone}/{p.local_layer} ({self.input_dim}-d), "
                f"not {backbone}/{local_layer} ({input_dim}-d)"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": PCA_FORMAT, "id": self.id, **asdict(self.provenance)}
        np.savez_compressed(
            path,
            mean=self.mean.astype(np.float32),
            components=self.components.astype(np.float32),
            explained_variance=self.explained_variance.astype(np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PcaArtifact":
        path = Path(path)
        if not path.is_file():
            raise WeightsNotFound("PCA artifact not found", str(path))
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                arrays = {k: npz[k] for k in ("mean", "components", "explained_variance")}
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsNotFound(f"not a delf-es PCA file ({exc})", str(path)) from exc
        if meta.get("format") != PCA_FORMAT:
            raise WeightsNotFound(f"not a delf-es PCA file (format {meta.get('format')!r})", str(path))
        fields = {k: meta[k] for k in PcaProvenance.__dataclass_fields__ if k in meta}
        return cls(provenance=PcaProvenance(**fields), **arrays)


def l2_normalise(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of (N, D) float32 (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, eps)).astype(np.float32)


def fit_pca(descriptors: np.ndarray, dims: int, provenance: PcaProvenance, seed: int = 0) -> PcaArtifact:
    """Fit PCA with scikit-learn on (N, D) L2-normalised descriptors."""
    from sklearn.decomposition import PCA

    if descriptors.ndim != 2:
        raise FeatureShapeError("descriptors", "(N, D)", str(descriptors.shape))
    n, dim = descriptors.shape
    if dims > dim:
        raise InvalidRequest(f"cannot reduce {dim}-d descriptors to {dims} dims")
    if n < dims:
        raise InvalidRequest(f"need at least {dims} descriptors to fit {dims} dims, got {n}")
    pca = PCA(n_components=dims, svd_solver="randomized" if n > 20000 else "full", random_state=seed)
    pca.fit(descriptors.astype(np.float64))
    return PcaArtifact(
        mean=pca.mean_.astype(np.float32),
        components=pca.components_.astype(np.float32),
        explained_variance=pca.explained_variance_.astype(np.float32),
        provenance=provenance,
    )
