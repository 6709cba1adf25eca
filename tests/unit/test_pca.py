"""PCA artifact: fit, round trip, compatibility checks."""

from __future__ import annotations

import numpy as np
import pytest

from delf_es.errors import ModelMismatch, WeightsNotFound
from delf_es.pca import PcaArtifact, PcaProvenance, fit_pca, l2_normalise


def _provenance(**kw):
    base = dict(backbone="b", local_layer="l", scoring="norm", fitted_on="random", num_images=1, num_descriptors=500)
    return PcaProvenance(**{**base, **kw})


@pytest.fixture()
def descriptors():
    rng = np.random.default_rng(0)
    # 500 descriptors living mostly in an 8-d subspace of 64-d
    basis = rng.normal(size=(8, 64))
    return l2_normalise((rng.normal(size=(500, 8)) @ basis + 0.01 * rng.normal(size=(500, 64))).astype(np.float32))


def test_pca_round_trip_keeps_numbers_id_and_provenance(descriptors, tmp_path):
    pca = fit_pca(descriptors, 8, _provenance())
    loaded = PcaArtifact.load(pca.save(tmp_path / "p.npz"))
    assert loaded.id == pca.id and loaded.provenance == pca.provenance
    np.testing.assert_array_equal(loaded.transform(descriptors), pca.transform(descriptors))
    assert (tmp_path / "p.json").is_file()


def test_transform_is_unit_norm_and_preserves_neighbours(descriptors):
    pca = fit_pca(descriptors, 8, _provenance())
    reduced = pca.transform(descriptors)
    assert reduced.shape == (500, 8)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    full_nn = np.argsort(-(descriptors @ descriptors.T), axis=1)[:, 1]
    reduced_nn = np.argsort(-(reduced @ reduced.T), axis=1)[:, 1]
    assert np.mean(full_nn == reduced_nn) > 0.9


def test_pca_id_changes_with_the_numbers(descriptors):
    a = fit_pca(descriptors, 8, _provenance())
    b = fit_pca(descriptors[:300], 8, _provenance())
    assert a.id != b.id and a.id.startswith("pca8-")


def test_pca_for_another_backbone_is_rejected(descriptors):
    pca = fit_pca(descriptors, 8, _provenance())
    with pytest.raises(ModelMismatch, match="fitted for b/l"):
        pca.check_compatible("efficientnet-lite2", "expand", 64)


def test_too_few_descriptors_or_dims_are_value_errors(descriptors):
    with pytest.raises(ValueError):
        fit_pca(descriptors[:4], 8, _provenance())
    with pytest.raises(ValueError):
        fit_pca(descriptors, 128, _provenance())


def test_missing_or_foreign_pca_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFound):
        PcaArtifact.load(tmp_path / "nope.npz")
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.raises(WeightsNotFound):
        PcaArtifact.load(tmp_path / "x.npz")
