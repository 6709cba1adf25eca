"""Resumable checkpoints and the per-epoch CSV log shared by both stages."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import torch

from delf_es.errors import WeightsNotFound

LOG_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def save_atomic(obj: dict, path: Path) -> Path:
    """torch.save through a temp file + rename: a killed run never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def load_checkpoint(path: Path, stage: str) -> dict:
    """A checkpoint written by :func:`save_atomic` for ``stage`` ('attention' or 'backbone')."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound("no checkpoint to resume from", str(path))
    # weights_only=False: the checkpoint also holds optimizer and RNG state; it is our own file
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("stage") != stage:
        raise WeightsNotFound(f"checkpoint is for stage {checkpoint.get('stage')!r}, not {stage!r}", str(path))
    return checkpoint


class EpochLog:
    """Appends one row per epoch to ``log.csv`` (kept across resumes)."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = Path(path)
        if not resume or not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(LOG_FIELDS)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, LOG_FIELDS).writerow({k: row.get(k, "") for k in LOG_FIELDS})


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(handle)]
