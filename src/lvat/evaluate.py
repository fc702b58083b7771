"""Evaluation: error rate, per-class accuracy, confusion matrix; eval mode, never augmented."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lvat.data import eval_batches


@dataclass
class Evaluation:
    """Classification results on one split."""

    error: float  # percent of misclassified images
    per_class_accuracy: list[float]  # percent, by true class
    confusion: list[list[int]]  # confusion[true][predicted]
    count: int

    def to_dict(self, prefix: str) -> dict:
        return {
            f"{prefix}_error": self.error,
            f"{prefix}_per_class_accuracy": self.per_class_accuracy,
            f"{prefix}_confusion_matrix": self.confusion,
            f"{prefix}_count": self.count,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Evaluate `model` (switched to eval mode, restored afterwards) on uint8 images `x`."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    try:
        for xb, yb in eval_batches(x, y, batch_size, device):
            pred = model(xb).argmax(1)
            confusion += torch.bincount(
                yb * num_classes + pred, minlength=num_classes * num_classes
            ).view(num_classes, num_classes)
    finally:
        model.train(was_training)
    confusion = confusion.cpu()  # the one host sync of an evaluation
    total = int(confusion.sum())
    correct = int(confusion.diagonal().sum())
    per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
    return Evaluation(
        error=100.0 * (total - correct) / max(total, 1),
        per_class_accuracy=[round(100.0 * float(a), 4) for a in per_class],
        confusion=confusion.tolist(),
        count=total,
    )
