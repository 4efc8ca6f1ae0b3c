"""Reading soft labels into student training.

- ``collation``: shard rows into padded batch tensors (``ShardRows``, ``collate``).
- ``plan``: pieces, the epoch's shuffle, the split over ranks and workers, resume points; pure functions.
- ``state``: where the stream stands (epoch, resume point, consumed), shared with DataLoader workers.
- ``reading``: the manifest, the checked row groups of the shards, and reads of pieces.
- ``dataset``: ``SoftLabelDataset``, the IterableDataset that wires them.
- ``loader``: ``SoftLabelLoader``, the DataLoader that records consumption.
"""

from __future__ import annotations

from ..inputs import NestedBlock
from .collation import ShardRows, collate
from .dataset import SoftLabelDataset
from .loader import SoftLabelLoader
from .plan import Piece

__all__ = ["SoftLabelDataset", "SoftLabelLoader", "collate", "Piece", "ShardRows", "NestedBlock"]
