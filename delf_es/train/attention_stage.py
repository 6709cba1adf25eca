"""Stage 2: train the attention head on the frozen backbone's cached local maps.

DELF's objective: scores a = softplus(head(f)) for every cell, pooled descriptor
y = mean over cells of a * f/|f| (attention_pool), logits = W y + b, cross-entropy on the
image's label.  Only the head and the linear classifier train; the classifier is thrown
away afterwards, the head scores keypoints at extraction time.
"""

from __future__ import annotations

import json
import math
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from delf_es.errors import ConfigurationError
from delf_es.model.attention import AttentionHead, attention_pool
from delf_es.train.checkpoint import EpochLog, load_checkpoint, save_atomic
from delf_es.train.objective import BACKGROUND_MODES, loss_and_correct, num_outputs
from delf_es.train.view_cache import ViewCache

log = logging.getLogger(__name__)
HEAD_FORMAT = "delf-es-attention/1"


@dataclass(frozen=True)
class AttentionConfig:
    """Attributes:
    epochs: total epochs (a resumed run continues up to this number).
    batch_size: views per step (all of one size).
    lr, weight_decay: AdamW.
    hidden: channels of the head's hidden 1x1 conv (DELF: 512).
    background_mode: 'negative' or 'class' (see objective.loss_and_correct).
    seed: batch order and initialisation.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 512
    background_mode: str = "negative"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background_mode not in BACKGROUND_MODES:
            raise ConfigurationError(f"background_mode must be one of {BACKGROUND_MODES}")


class AttentionTrainer(nn.Module):
    """Head + linear classifier over the attention-pooled, L2-normalised local descriptors."""

    def __init__(self, channels: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.head = AttentionHead(channels, hidden)
        self.classifier = nn.Linear(channels, outputs)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) raw local maps -> (B, outputs) logits."""
        scores = self.head(maps)
        unit = maps / maps.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return self.classifier(attention_pool(unit, scores))


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay from ``base`` (epoch 1) towards 0 (after ``epochs``); stateless, so a
    resumed run with more epochs follows the schedule of the new total."""
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, epochs)))


def batches(cache: ViewCache, split: str, batch_size: int, rng: np.random.Generator | None) -> list[tuple[int, np.ndarray]]:
    """(size, record indices) batches of one view size each; shuffled when rng is given."""
    out = []
    for size in sorted({r.size for r in cache.records}):
        chosen = np.array([i for i, r in enumerate(cache.records) if r.split == split and r.size == size])
        if len(chosen) == 0:
            continue
        if rng is not None:
            chosen = rng.permutation(chosen)
        out += [(size, chosen[i : i + batch_size]) for i in range(0, len(chosen), batch_size)]
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def load_batch(cache: ViewCache, arrays: dict, size: int, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.array([cache.records[i].row for i in indices])
    order = np.argsort(rows)  # sorted reads from the memory map
    maps = torch.from_numpy(np.asarray(arrays[size][rows[order]], dtype=np.float32))
    labels = torch.tensor([cache.records[i].label for i in indices[order]])
    return maps, labels


def run_epoch(model, cache, arrays, split, config, optimizer=None, rng=None) -> tuple[float, float]:
    """One pass over ``split``; trains when an optimizer is given.  Returns (mean loss, accuracy)."""
    model.train(optimizer is not None)
    total_loss, total, correct, counted = 0.0, 0, 0, 0
    plan = batches(cache, split, config.batch_size, rng)
    with torch.set_grad_enabled(optimizer is not None):
        for size, indices in tqdm(plan, desc=split, leave=False, unit="batch"):
            if optimizer is not None and len(indices) < 2:
                continue  # BatchNorm needs two samples
            maps, labels = load_batch(cache, arrays, size, indices)
            loss, right, count = loss_and_correct(model(maps), labels, config.background_mode)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total_loss += float(loss.detach()) * len(indices)
            total += len(indices)
            correct += right
            counted += count
    return (total_loss / total if total else float("nan"), correct / counted if counted else float("nan"))


def head_artifact(model: AttentionTrainer, cache: ViewCache, config: AttentionConfig, provenance: dict) -> dict:
    """What ``build_model`` loads: the head's state_dict plus how it was made."""
    return {
        "format": HEAD_FORMAT,
        "state_dict": {k: v.detach().clone() for k, v in model.head.state_dict().items()},
        "meta": {"config": asdict(config), "classes": list(cache.classes), **provenance},
    }


def train_attention(
    cache: ViewCache,
    config: AttentionConfig,
    out_dir: Path,
    resume: bool = False,
    provenance: dict | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume) and write ``out_dir``/{last.pt, log.csv, attention.pt, train.json}.

    ``stop_after`` ends this run after that epoch (a time-boxed session); ``resume`` later
    continues the same schedule up to ``config.epochs``.

    Returns the summary written to train.json (per-epoch history, seconds, final numbers).
    """
    out_dir = Path(out_dir)
    outputs = num_outputs(len(cache.classes), config.background_mode)
    torch.manual_seed(config.seed)
    model = AttentionTrainer(cache.local_dim, config.hidden, outputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    start, history, seconds = 0, [], 0.0
    if resume and (out_dir / "last.pt").is_file():
        checkpoint = load_checkpoint(out_dir / "last.pt", "attention")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.bit_generator.state = checkpoint["rng"]
        torch.set_rng_state(checkpoint["torch_rng"])
        start, history, seconds = checkpoint["epoch"], checkpoint["history"], checkpoint["seconds"]
        log.info("resuming at epoch %d", start + 1)
    epoch_log = EpochLog(out_dir / "log.csv", resume=resume and start > 0)
    arrays = {size: cache.maps(size) for size in {r.size for r in cache.records}}
    has_val = any(r.split == "val" for r in cache.records)
    for epoch in range(start + 1, min(config.epochs, stop_after or config.epochs) + 1):
        started = time.perf_counter()
        lr = cosine_lr(config.lr, epoch, config.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss, train_acc = run_epoch(model, cache, arrays, "train", config, optimizer, rng)
        val_loss, val_acc = run_epoch(model, cache, arrays, "val", config) if has_val else (None, None)
        seconds += time.perf_counter() - started
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr, "seconds": round(seconds, 2)}
        history.append(row)
        epoch_log.append(row)
        log.info("epoch %d: %s", epoch, row)
        save_atomic({"stage": "attention", "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                     "history": history, "seconds": seconds, "config": asdict(config), "classes": list(cache.classes)},
                    out_dir / "last.pt")
    summary = {"epochs": len(history), "train_seconds": round(seconds, 1), "history": history,
               "views": {s: sum(1 for r in cache.records if r.split == s) for s in ("train", "val")},
               "classes": len(cache.classes), "config": asdict(config), "view_cache": str(cache.folder)}
    save_atomic(head_artifact(model, cache, config, {**(provenance or {}), "train_seconds": summary["train_seconds"],
                                                     "final": history[-1] if history else None}),
                out_dir / "attention.pt")
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
