"""softlabels: offline knowledge distillation at corpus scale.

Teachers run once over a corpus; their top-k log-probabilities are stored in Parquet shards
(format ``softlabels.v1``) that students read many times. Importing this package does not import
torch, so ``verify`` and ``inspect`` stay light.
"""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
