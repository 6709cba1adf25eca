"""Heads learned from known geometry (a :class:`~delf_es.train.geometry.PairCache`), no labels.

1. **Matchability attention** (``train_matchability``): the DELF head (1x1 conv, BN, ReLU,
   1x1 conv, softplus) scores each cell of the raw local map; its target is whether the cell's
   descriptor survives the warp: the cell's mutual nearest neighbour in the other view (cosine
   of the PCA-reduced descriptors, as the product matches) lies within one stride (16 px) of
   where the homography sends it.  Cells that land outside the other view are left out.
   Objectives: ``bce`` (binary cross-entropy with p = a / (1 + a), i.e. logit log a) or
   ``rank`` (pairwise logistic ranking of every matchable cell above every unmatchable cell
   of the same view: an AUC surrogate, order-only like R2D2's AP reliability loss).
2. **Learned local descriptor** (``train_descriptor``): a linear projection 720 -> 40 applied
   after the PCA's centring, initialised from the PCA's axes, trained with InfoNCE over true
   correspondences (the cell of view B where an A cell lands is the positive; every other B
   cell of the same pair (same-image hard negatives) and of the other pairs of the batch
   (in-batch negatives) are negatives, except B cells within one stride of the landing point),
   plus a DELG-style reconstruction term through a linear decoder 40 -> 720.  It ships as a
   :class:`~delf_es.pca.PcaArtifact` with ``method="proj"`` (model id ``...-proj40-<hash>``),
   so extraction, indexing and search use it as they use the PCA.

Validation (the numbers that choose between variants; never paris250): on held-out photos'
pairs, select the top-k cells of each view by the score, match them by mutual nearest
neighbour with ``max_distance`` and count the matches whose landing point is within 16 px.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from delf_es.errors import ConfigurationError
from delf_es.model.attention import AttentionHead
from delf_es.pca import PcaArtifact, PcaProvenance
from delf_es.train.attention_stage import HEAD_FORMAT, cosine_lr
from delf_es.train.checkpoint import save_atomic
from delf_es.train.geometry import PairCache, cell_centres_px, warp_points

log = logging.getLogger(__name__)
OBJECTIVES = ("bce", "rank")


@dataclass(frozen=True)
class Correspondence:
    """Ground truth of one pair, both directions.

    Attributes:
        target_ab: (n,) int64 B cell nearest to where each A cell lands, -1 outside B.
        target_ba: (n,) the same from B to A (inverse homography).
        near_ab: (n, n) bool, A cell i lands within one stride of B cell j (bool matrix).
        near_ba: (n, n) bool, B cell i lands within one stride of A cell j.
    """

    target_ab: np.ndarray
    target_ba: np.ndarray
    near_ab: np.ndarray
    near_ba: np.ndarray


def correspondences(cache: PairCache, index: int) -> Correspondence:
    cells, stride = cache.cells, cache.rf_jump
    centres = cell_centres_px(cells, cache.rf_start, stride)
    out = []
    for h in (cache.homographies[index], np.linalg.inv(cache.homographies[index])):
        landed = warp_points(h, centres)
        distance = np.linalg.norm(landed[:, None, :] - centres[None, :, :], axis=2)  # (n, n) px
        distance[~np.isfinite(distance)] = np.inf
        inside = np.isfinite(landed).all(axis=1) & (landed >= cache.rf_start - stride / 2).all(axis=1) & \
            (landed <= cache.rf_start + stride * (cells - 0.5)).all(axis=1)
        target = np.where(inside, distance.argmin(axis=1), -1)
        out.append((target, distance <= stride))
    return Correspondence(out[0][0], out[1][0], out[0][1], out[1][1])


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-6)


def _cells(maps: np.ndarray) -> torch.Tensor:
    """(C, h, w) float16 map -> (h*w, C) float32 rows (row-major cells)."""
    return torch.from_numpy(np.asarray(maps, np.float32)).flatten(1).T


def matchable(desc_a: torch.Tensor, desc_b: torch.Tensor, truth: Correspondence) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float32 targets of A's and B's cells: 1 matchable, 0 not, nan left out (lands outside).

    ``desc_*`` are (n, d) unit descriptors as the product matches them."""
    similarity = (desc_a @ desc_b.T).numpy()
    nn_ab, nn_ba = similarity.argmax(axis=1), similarity.argmax(axis=0)
    n = len(nn_ab)
    out = []
    for nn_fwd, nn_back, target, near in ((nn_ab, nn_ba, truth.target_ab, truth.near_ab),
                                           (nn_ba, nn_ab, truth.target_ba, truth.near_ba)):
        mutual = nn_back[nn_fwd] == np.arange(n)
        good = mutual & near[np.arange(n), nn_fwd]
        y = good.astype(np.float32)
        y[target < 0] = np.nan
        out.append(y)
    return out[0], out[1]


def pca_descriptors(cells: torch.Tensor, pca: PcaArtifact) -> torch.Tensor:
    """(n, 720) raw cells -> (n, d) unit PCA descriptors (the product's L2 -> PCA -> L2)."""
    unit = _unit(cells)
    mean = torch.from_numpy(pca.mean)
    components = torch.from_numpy(pca.components)
    return _unit((unit - mean) @ components.T)


# ---------------------------------------------------------------- validation metric


def correct_matches(desc_a: torch.Tensor, desc_b: torch.Tensor, score_a: np.ndarray, score_b: np.ndarray,
                    truth: Correspondence, k: int, max_distance: float) -> tuple[int, int]:
    """(correct, total) mutual-NN matches among the top-``k`` cells of each view by score."""
    top_a = np.argsort(-score_a, kind="stable")[:k]
    top_b = np.argsort(-score_b, kind="stable")[:k]
    similarity = (desc_a[top_a] @ desc_b[top_b].T).numpy()
    fwd, back = similarity.argmax(axis=1), similarity.argmax(axis=0)
    mutual = back[fwd] == np.arange(len(top_a))
    close = np.sqrt(np.maximum(2 - 2 * similarity[np.arange(len(top_a)), fwd], 0)) < max_distance
    keep = mutual & close
    correct = truth.near_ab[top_a[keep], top_b[fwd[keep]]]
    return int(correct.sum()), int(keep.sum())


# ---------------------------------------------------------------- matchability attention


@dataclass(frozen=True)
class MatchabilityConfig:
    """Attributes:
    objective: "bce" or "rank".
    epochs, batch_pairs, lr, weight_decay: AdamW over batches of pairs (both views).
    hidden: channels of the head's hidden 1x1 conv (DELF: 512).
    top_fraction: share of cells selected for the validation metric.
    seed: initialisation and batch order.
    """

    objective: str = "bce"
    epochs: int = 12
    batch_pairs: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 512
    top_fraction: float = 0.25
    max_distance: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigurationError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def matchability_loss(scores: torch.Tensor, targets: torch.Tensor, objective: str) -> torch.Tensor:
    """``scores`` (V, n) head outputs >= 0, ``targets`` (V, n) 1 / 0 / nan (left out)."""
    logit = torch.log(scores.clamp_min(1e-6))
    valid = ~torch.isnan(targets)
    if objective == "bce":
        return F.binary_cross_entropy_with_logits(logit[valid], targets[valid])
    losses = []
    for row_logit, row_target, row_valid in zip(logit, targets, valid):
        pos = row_logit[row_valid & (row_target == 1)]
        neg = row_logit[row_valid & (row_target == 0)]
        if len(pos) and len(neg):
            losses.append(F.softplus(neg[None, :] - pos[:, None]).mean())
    return torch.stack(losses).mean() if losses else logit.sum() * 0


def _prepare(cache: PairCache, pca: PcaArtifact) -> dict:
    """Per pair: targets of both views and the ground-truth geometry (numpy, computed once)."""
    maps_a, maps_b = cache.maps("a"), cache.maps("b")
    truths, targets = {}, {}
    for index in np.flatnonzero(cache.split != "unused"):
        truth = correspondences(cache, index)
        targets[index] = matchable(pca_descriptors(_cells(maps_a[index]), pca), pca_descriptors(_cells(maps_b[index]), pca), truth)
        truths[index] = truth
    return {"truths": truths, "targets": targets}


def _views(cache: PairCache, rows: np.ndarray) -> torch.Tensor:
    """(2B, C, h, w) float32 maps: the A views of ``rows`` then their B views."""
    order = np.sort(rows)
    a = np.asarray(cache.maps("a")[order], np.float32)
    b = np.asarray(cache.maps("b")[order], np.float32)
    return torch.from_numpy(np.concatenate([a, b])), order


def evaluate_selection(cache: PairCache, pca: PcaArtifact, prepared: dict, score_fn, rows: np.ndarray,
                       config: MatchabilityConfig) -> dict:
    """Correct mutual-NN matches among the top cells by ``score_fn`` ((n, C) raw -> (n,) scores)."""
    k = max(1, int(round(config.top_fraction * cache.cells**2)))
    correct = total = positives = selected = 0
    maps_a, maps_b = cache.maps("a"), cache.maps("b")
    with torch.no_grad():
        for index in rows:
            raw_a, raw_b = _cells(maps_a[index]), _cells(maps_b[index])
            sa, sb = score_fn(raw_a), score_fn(raw_b)
            good, count = correct_matches(pca_descriptors(raw_a, pca), pca_descriptors(raw_b, pca), sa, sb,
                                          prepared["truths"][index], k, config.max_distance)
            correct, total = correct + good, total + count
            ya = prepared["targets"][index][0]
            top = np.argsort(-sa, kind="stable")[:k]
            positives += int(np.nansum(ya[top]))
            selected += int((~np.isnan(ya[top])).sum())
    return {"correct_matches_per_pair": correct / max(1, len(rows)), "match_precision": correct / max(1, total),
            "selected_matchable_fraction": positives / max(1, selected), "pairs": int(len(rows)), "top_k": k}


def train_matchability(cache: PairCache, pca: PcaArtifact, config: MatchabilityConfig, out_dir: Path,
                       provenance: dict | None = None) -> dict:
    """Train the head; writes ``out_dir``/{attention.pt, train.json}; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = _prepare(cache, pca)
    prepare_seconds = time.perf_counter() - started
    torch.manual_seed(config.seed)
    head = AttentionHead(cache.local_dim, config.hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    train_rows = np.flatnonzero(cache.split == "train")
    val_rows = np.flatnonzero(cache.split == "val")
    history = []

    def head_scores(raw: torch.Tensor) -> np.ndarray:
        head.eval()
        side = cache.cells
        return head(raw.T.reshape(1, -1, side, side))[0, 0].flatten().numpy()

    baseline = {"norm": evaluate_selection(cache, pca, prepared, lambda raw: raw.norm(dim=1).numpy(), val_rows, config)}
    train_seconds = 0.0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.lr, epoch, config.epochs)
        head.train()
        losses = []
        order = rng.permutation(train_rows)
        for start in range(0, len(order), config.batch_pairs):
            rows = order[start : start + config.batch_pairs]
            if len(rows) < 2:
                continue
            maps, sorted_rows = _views(cache, rows)
            targets = torch.from_numpy(np.stack([prepared["targets"][i][0] for i in sorted_rows] +
                                                [prepared["targets"][i][1] for i in sorted_rows]))
            scores = head(maps)[:, 0].flatten(1)
            loss = matchability_loss(scores, targets, config.objective)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        train_seconds += time.perf_counter() - t0
        with torch.no_grad():
            head.eval()
            val_targets, val_scores = [], []
            for start in range(0, len(val_rows), config.batch_pairs):
                rows = val_rows[start : start + config.batch_pairs]
                maps, sorted_rows = _views(cache, rows)
                val_scores.append(head(maps)[:, 0].flatten(1))
                val_targets.append(torch.from_numpy(np.stack([prepared["targets"][i][0] for i in sorted_rows] +
                                                             [prepared["targets"][i][1] for i in sorted_rows])))
            val_loss = float(matchability_loss(torch.cat(val_scores), torch.cat(val_targets), config.objective))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
               "seconds": round(train_seconds, 1)}
        history.append(row)
        log.info("matchability %s epoch %d: %s", config.objective, epoch, row)
    final = evaluate_selection(cache, pca, prepared, lambda raw: head_scores(raw), val_rows, config)
    summary = {"objective": config.objective, "config": asdict(config), "history": history,
               "train_seconds": round(train_seconds, 1), "prepare_seconds": round(prepare_seconds, 1),
               "val": {"head": final, **baseline}, "pairs": {"train": int(len(train_rows)), "val": int(len(val_rows))},
               "pair_cache": str(cache.folder), **(provenance or {})}
    meta = {**(provenance or {}), "objective": config.objective, "train_seconds": summary["train_seconds"],
            "final": history[-1] if history else None, "classes": [], "val": summary["val"]}
    save_atomic({"format": HEAD_FORMAT, "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
                 "meta": meta}, out_dir / "attention.pt")
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- learned descriptor


@dataclass(frozen=True)
class DescriptorConfig:
    """Attributes:
    epochs, batch_pairs, lr: AdamW over batches of pairs.
    anchors: A cells sampled per pair (among those landing inside B).
    temperature: InfoNCE temperature.
    reconstruction: weight of the decoder's reconstruction loss (DELG's autoencoder term).
    """

    epochs: int = 15
    batch_pairs: int = 16
    lr: float = 1e-3
    anchors: int = 96
    temperature: float = 0.07
    reconstruction: float = 1.0
    top_fraction: float = 0.25
    max_distance: float = 0.9
    seed: int = 0


class Projection(nn.Module):
    """y = L2(W (L2(x) - mean)); decoder x' = V y (reconstruction of the unit raw descriptor)."""

    def __init__(self, pca: PcaArtifact) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(pca.mean.copy()))
        self.encode = nn.Linear(pca.input_dim, pca.dims, bias=False)
        self.decode = nn.Linear(pca.dims, pca.input_dim, bias=True)
        with torch.no_grad():
            self.encode.weight.copy_(torch.from_numpy(pca.components))
            self.decode.weight.copy_(torch.from_numpy(pca.components.T.copy()))
            self.decode.bias.copy_(self.mean)

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = _unit(raw)
        code = self.encode(unit - self.mean)
        return _unit(code), unit

    def artifact(self, provenance: PcaProvenance, variance: np.ndarray) -> PcaArtifact:
        return PcaArtifact(mean=self.mean.numpy().astype(np.float32),
                           components=self.encode.weight.detach().numpy().astype(np.float32),
                           explained_variance=variance.astype(np.float32), provenance=provenance)


def descriptor_loss(model: Projection, raw_a: list[torch.Tensor], raw_b: list[torch.Tensor],
                    truths: list[Correspondence], config: DescriptorConfig, rng: np.random.Generator):
    """InfoNCE over (anchor in A, its landing cell in B) against every B cell of the batch, plus
    reconstruction; returns (loss, nce, reconstruction)."""
    anchors, positives, exclude = [], [], []
    offset = 0
    for raw, truth in zip(raw_a, truths):
        valid = np.flatnonzero(truth.target_ab >= 0)
        pick = rng.choice(valid, size=min(config.anchors, len(valid)), replace=False) if len(valid) else valid
        anchors.append(raw[pick])
        positives.append(truth.target_ab[pick] + offset)
        exclude.append((pick, offset))
        offset += len(raw)
    total_b = torch.cat(raw_b)
    code_b, unit_b = model(total_b)
    anchor_raw = torch.cat(anchors)
    code_a, unit_a = model(anchor_raw)
    logits = code_a @ code_b.T / config.temperature
    mask = torch.zeros_like(logits, dtype=torch.bool)  # near-positives are not negatives
    row = 0
    for (pick, start), truth in zip(exclude, truths):
        block = torch.from_numpy(truth.near_ab[pick])
        mask[row : row + len(pick), start : start + block.shape[1]] = block
        row += len(pick)
    target = torch.from_numpy(np.concatenate(positives))
    mask[torch.arange(len(target)), target] = False
    logits = logits.masked_fill(mask, float("-inf"))
    nce = F.cross_entropy(logits, target)
    recon = F.mse_loss(model.decode(code_b), unit_b) * unit_b.shape[1]
    return nce + config.reconstruction * recon, nce, recon


def evaluate_descriptor(cache: PairCache, describe, rows: np.ndarray, truths: dict, config: DescriptorConfig) -> dict:
    """Correct mutual-NN matches among the top cells by descriptor norm, described by ``describe``."""
    k = max(1, int(round(config.top_fraction * cache.cells**2)))
    correct = total = 0
    maps_a, maps_b = cache.maps("a"), cache.maps("b")
    with torch.no_grad():
        for index in rows:
            raw_a, raw_b = _cells(maps_a[index]), _cells(maps_b[index])
            good, count = correct_matches(describe(raw_a), describe(raw_b), raw_a.norm(dim=1).numpy(),
                                          raw_b.norm(dim=1).numpy(), truths[index], k, config.max_distance)
            correct, total = correct + good, total + count
    return {"correct_matches_per_pair": correct / max(1, len(rows)), "match_precision": correct / max(1, total),
            "pairs": int(len(rows)), "top_k": k}


def train_descriptor(cache: PairCache, pca: PcaArtifact, config: DescriptorConfig, out_path: Path,
                     provenance: dict | None = None) -> dict:
    """Train the projection; writes the artifact ``out_path`` (.npz + .json) and ``<stem>.train.json``."""
    started = time.perf_counter()
    truths = {i: correspondences(cache, i) for i in np.flatnonzero(cache.split != "unused")}
    prepare_seconds = time.perf_counter() - started
    torch.manual_seed(config.seed)
    model = Projection(pca)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    train_rows = np.flatnonzero(cache.split == "train")
    val_rows = np.flatnonzero(cache.split == "val")
    maps_a, maps_b = cache.maps("a"), cache.maps("b")
    baseline = evaluate_descriptor(cache, lambda raw: pca_descriptors(raw, pca), val_rows, truths, config)
    history, train_seconds = [], 0.0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.lr, epoch, config.epochs)
        model.train()
        parts = []
        order = rng.permutation(train_rows)
        for start in range(0, len(order), config.batch_pairs):
            rows = np.sort(order[start : start + config.batch_pairs])
            a = np.asarray(maps_a[rows], np.float32)
            b = np.asarray(maps_b[rows], np.float32)
            raw_a = [torch.from_numpy(m).flatten(1).T for m in a]
            raw_b = [torch.from_numpy(m).flatten(1).T for m in b]
            loss, nce, recon = descriptor_loss(model, raw_a, raw_b, [truths[i] for i in rows], config, rng)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            parts.append((float(loss.detach()), float(nce.detach()), float(recon.detach())))
        train_seconds += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            val_parts = []
            for start in range(0, len(val_rows), config.batch_pairs):
                rows = np.sort(val_rows[start : start + config.batch_pairs])
                raw_a = [torch.from_numpy(m).flatten(1).T for m in np.asarray(maps_a[rows], np.float32)]
                raw_b = [torch.from_numpy(m).flatten(1).T for m in np.asarray(maps_b[rows], np.float32)]
                _, nce, recon = descriptor_loss(model, raw_a, raw_b, [truths[i] for i in rows], config,
                                                np.random.default_rng(0))
                val_parts.append((float(nce), float(recon)))
        mean = np.mean(parts, axis=0)
        row = {"epoch": epoch, "train_loss": float(mean[0]), "train_nce": float(mean[1]), "train_recon": float(mean[2]),
               "val_nce": float(np.mean([p[0] for p in val_parts])), "val_recon": float(np.mean([p[1] for p in val_parts])),
               "seconds": round(train_seconds, 1)}
        history.append(row)
        log.info("descriptor epoch %d: %s", epoch, row)
    model.eval()
    learned = evaluate_descriptor(cache, lambda raw: model(raw)[0], val_rows, truths, config)
    with torch.no_grad():
        sample = torch.cat([_cells(maps_a[i]) for i in train_rows[:200]])
        codes = model.encode(_unit(sample) - model.mean).numpy()
    variance = codes.var(axis=0)
    prov = PcaProvenance(
        backbone=pca.provenance.backbone, local_layer=pca.provenance.local_layer, scoring=pca.provenance.scoring,
        fitted_on=(provenance or {}).get("fitted_on", "homography pairs of training photos"),
        num_images=int(len(set(cache.photos[train_rows].tolist()))), num_descriptors=int(len(train_rows) * cache.cells**2),
        command=(provenance or {}).get("command", ""), method="proj")
    artifact = model.artifact(prov, variance)
    artifact.save(out_path)
    summary = {"config": asdict(config), "history": history, "train_seconds": round(train_seconds, 1),
               "prepare_seconds": round(prepare_seconds, 1), "val": {"learned": learned, "pca": baseline},
               "pairs": {"train": int(len(train_rows)), "val": int(len(val_rows))}, "artifact": artifact.id,
               "initialised_from": pca.id, "pair_cache": str(cache.folder), **(provenance or {})}
    Path(out_path).with_suffix(".train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
