"""Training a student from soft labels, by concept:

- ``objective``: the loss on a batch (``batch_losses``, ``soft_label_loss``), shared by
  ``train-student`` and the HF Trainer (``softlabels.hf_trainer``).
- ``evaluation``: ``evaluate``, the --eval metrics.
- ``sources``: the --data / --eval directories verified and opened, and the multi-source stream.
- ``student``: the student built from ``--student`` and probed.
- ``checkpoint``: checkpoint save, load and resume checks; the student files; what --out may hold.
- ``metrics``: ``metrics.jsonl`` and the run's summary.
- ``recipe``: ``DistillationRecipe`` wiring them, and ``train_student``.

The names below load their module on first use, so ``softlabels.train.objective`` can be imported
without the recipe.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..options import TrainConfig
    from .checkpoint import canonical_safetensors
    from .evaluation import evaluate
    from .metrics import MetricsLog, TrainSummary
    from .objective import batch_losses, hard_labels, soft_label_loss, stored_kd_per_position, student_logits, teacher_top1
    from .recipe import DistillationRecipe, train_student

__all__ = ["TrainConfig", "TrainSummary", "DistillationRecipe", "train_student", "evaluate", "student_logits", "hard_labels",
           "batch_losses", "soft_label_loss", "stored_kd_per_position", "teacher_top1", "MetricsLog", "canonical_safetensors"]

_WHERE = {
    "TrainConfig": "softlabels.options",
    "TrainSummary": "softlabels.train.metrics",
    "MetricsLog": "softlabels.train.metrics",
    "DistillationRecipe": "softlabels.train.recipe",
    "train_student": "softlabels.train.recipe",
    "evaluate": "softlabels.train.evaluation",
    "canonical_safetensors": "softlabels.train.checkpoint",
    **{name: "softlabels.train.objective" for name in ("student_logits", "hard_labels", "batch_losses", "soft_label_loss",
                                                       "stored_kd_per_position", "teacher_top1")},
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'softlabels.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
