"""Where a ``SoftLabelDataset`` stands in its stream: the epoch, the resume point, and what the
consumer has taken, shared with DataLoader worker processes."""

from __future__ import annotations

import torch

from ..errors import UserError

__all__ = ["StreamState"]


class StreamState:
    """The epoch, the batches to skip and the batches worker processes made live in shared memory,
    so workers (persistent ones too) see ``set_epoch`` and ``load_state`` made after they started;
    ``consumed`` (the consumer's next batch index) and ``recorded`` are this process's own."""

    def __init__(self) -> None:
        # [epoch, batches to skip, batches made by worker processes]
        self.shared = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.consumed = 0
        self.recorded = False

    @property
    def epoch(self) -> int:
        return int(self.shared[0])

    @property
    def skip(self) -> int:
        """Batches of the epoch the next iteration skips (a resume point)."""
        return int(self.shared[1])

    @skip.setter
    def skip(self, value: int) -> None:
        self.shared[1] = value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a resume point is kept only for its own epoch."""
        if epoch != self.epoch:
            self.skip = 0
            self.consumed = 0
            self.shared[2] = 0
            self.recorded = False
        self.shared[0] = epoch

    def record(self, batch_index: int) -> None:
        """The consumer has taken the batch at ``batch_index`` of the stream."""
        self.consumed = batch_index + 1
        self.recorded = True

    def produced(self, batch_index: int, in_worker: bool) -> None:
        """A batch was made: in the main process it counts as consumed, in a worker it is counted."""
        if in_worker:
            self.shared[2] += 1
        else:
            self.consumed = batch_index + 1

    def state_dict(self, seed: int, world_size: int) -> dict[str, int]:
        """The resume point of the current epoch.

        Raises:
            UserError: worker processes made batches through a loader that did not record them.
        """
        if int(self.shared[2]) > 0 and not self.recorded:
            raise UserError("SoftLabelDataset: batches came from DataLoader workers that softlabels cannot see; "
                            "iterate with softlabels.SoftLabelLoader(dataset, num_workers=N) so the resume point is known")
        return {"epoch": self.epoch, "batches": self.consumed, "seed": seed, "world_size": world_size}

    def load(self, epoch: int, batches: int) -> None:
        """Resume at batch ``batches`` of ``epoch``."""
        self.shared[0] = epoch
        self.skip = batches
        self.consumed = batches
        self.recorded = True

    def snapshot(self) -> tuple[int, int]:
        return self.skip, self.consumed

    def restore(self, saved: tuple[int, int]) -> None:
        self.skip, self.consumed = saved
