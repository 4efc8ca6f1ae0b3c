"""``SoftLabelLoader``: the DataLoader over a ``SoftLabelDataset`` that records what it hands out."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader

from ..errors import UserError, VerificationError
from .dataset import SoftLabelDataset

__all__ = ["SoftLabelLoader"]


class SoftLabelLoader(DataLoader):
    """A DataLoader over a ``SoftLabelDataset`` that records every batch it hands out.

    Batching happens in the dataset (``batch_size=None``). Because the loader tells the dataset what
    the consumer took, ``dataset.state_dict()`` is the exact resume point however many workers
    prefetch ahead, and the trainer never reports consumption itself.
    """

    def __init__(self, dataset: SoftLabelDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, SoftLabelDataset):
            raise TypeError(f"SoftLabelLoader takes a SoftLabelDataset, not {type(dataset).__name__}")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dataset: SoftLabelDataset = self.dataset  # type: ignore[assignment]
        try:
            for batch in super().__iter__():
                dataset.record_consumed(batch)
                yield batch
        except (UserError, VerificationError) as exc:
            raise _worker_error(exc) from None
        dataset.end_of_epoch()


def _worker_error(exc: ValueError) -> ValueError:
    """A worker's one-line error as it was raised there: torch re-raises it with the worker's
    traceback in the message ("Caught X in DataLoader worker process N. Original Traceback ...")."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return exc
    name, _, message = lines[-1].partition(": ")  # the traceback's last line: "module.Type: message"
    return type(exc)(message if message and name.rsplit(".", 1)[-1] == type(exc).__name__ else lines[-1])
