"""softlabels: offline knowledge distillation at corpus scale.

Teachers run once over a corpus; their targets (top-k log-probabilities, or sampled ids) are stored in
Parquet shards (format ``softlabels.v2``) that students read many times. The names below are the
library's public surface, each taught by the README under this one import path::

    from softlabels import generate, GenerateConfig, verify, RunDirectory      # write and check shards
    from softlabels import SoftLabelDataset, SoftLabelLoader, collate          # read them
    from softlabels import kd_loss, dense_kd_loss, hard_label_loss             # the objective
    from softlabels import train_student, TrainConfig                          # the train-student recipe
    from softlabels import SoftLabelTrainer, SoftLabelCollator, load_soft_label_dataset  # HF Trainer

The HF Trainer pieces import transformers, so they load on first use; everything else loads with the
package (torch included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # before the imports below: the modules record it in what they write

from .codec import LogprobCodec
from .data import SoftLabelDataset, SoftLabelLoader, collate
from .generate import generate
from .losses import dense_kd_loss, hard_label_loss, kd_loss
from .options import GenerateConfig, TrainConfig
from .rundir import RunDirectory
from .train import train_student
from .verify import verify

if TYPE_CHECKING:
    from .hf_trainer import SoftLabelCollator, SoftLabelTrainer, load_soft_label_dataset

__all__ = [
    "__version__",
    "generate", "GenerateConfig", "verify", "RunDirectory",
    "SoftLabelDataset", "SoftLabelLoader", "collate", "LogprobCodec",
    "kd_loss", "dense_kd_loss", "hard_label_loss",
    "train_student", "TrainConfig",
    "SoftLabelTrainer", "SoftLabelCollator", "load_soft_label_dataset",
]

_ON_FIRST_USE = {"SoftLabelTrainer": "softlabels.hf_trainer", "SoftLabelCollator": "softlabels.hf_trainer",
                 "load_soft_label_dataset": "softlabels.hf_trainer"}


def __getattr__(name: str) -> Any:
    if name in _ON_FIRST_USE:
        import importlib

        value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softlabels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
