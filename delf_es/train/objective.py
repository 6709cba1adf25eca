"""The classification objective both stages share: cross-entropy on image labels, with
background images either as one extra class or as negatives (uniform target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from delf_es.train.data import BACKGROUND

BACKGROUND_MODES = ("negative", "class")


def num_outputs(num_classes: int, background_mode: str) -> int:
    return num_classes + 1 if background_mode == "class" else num_classes


def loss_and_correct(logits: torch.Tensor, labels: torch.Tensor, background_mode: str) -> tuple[torch.Tensor, int, int]:
    """Args: logits (B, K'), labels (B,) with BACKGROUND for background images.

    'negative': background targets are uniform over the K classes, so the easiest way to
    fit them is to pool (near) nothing -- DELF's wish that distractors get low attention.
    'class': background is class K.  Returns (mean loss, correct, counted); accuracy counts
    only landmark images in 'negative' mode (a uniform target has no right answer).
    """
    background = labels == BACKGROUND
    if background_mode == "class":
        targets = torch.where(background, logits.shape[1] - 1, labels)
        loss = F.cross_entropy(logits, targets)
        correct = int((logits.argmax(1) == targets).sum())
        return loss, correct, len(labels)
    soft = torch.zeros_like(logits)
    soft[background] = 1.0 / logits.shape[1]
    rows = torch.nonzero(~background).squeeze(1)
    soft[rows, labels[rows]] = 1.0
    loss = F.cross_entropy(logits, soft)
    correct = int((logits[~background].argmax(1) == labels[~background]).sum())
    return loss, correct, int((~background).sum())
