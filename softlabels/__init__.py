"""softlabels: offline knowledge distillation at corpus scale.

Teachers run once over a corpus; their top-k log-probabilities are stored in Parquet shards
(format ``softlabels.v2``) that students read many times. Importing this package does not import
torch (the model-side names below load on first use), so ``verify`` and ``inspect`` stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "SoftLabelDataset", "SoftLabelLoader", "LogprobCodec", "collate", "kd_loss", "dense_kd_loss", "hard_label_loss",
           "SoftLabelTrainer", "SoftLabelCollator", "load_soft_label_dataset"]
__version__ = "0.2.0"

_LAZY = {
    "SoftLabelDataset": "softlabels.data",
    "SoftLabelLoader": "softlabels.data",
    "LogprobCodec": "softlabels.codec",
    "collate": "softlabels.data",
    "kd_loss": "softlabels.losses",
    "dense_kd_loss": "softlabels.losses",
    "hard_label_loss": "softlabels.losses",
    "SoftLabelTrainer": "softlabels.hf_trainer",
    "SoftLabelCollator": "softlabels.hf_trainer",
    "load_soft_label_dataset": "softlabels.hf_trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
