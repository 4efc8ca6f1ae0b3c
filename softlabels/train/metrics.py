"""What a ``train-student`` run reports: ``metrics.jsonl`` records and the closing summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..storage import Location, append_line, atomic_write_text

__all__ = ["MetricsLog", "TrainSummary"]


@dataclass
class TrainSummary:
    """A run's outcome: ``out``, the ``steps`` taken, the ``positions`` trained on, the last step's
    loss, the --eval metrics (None without), wall ``seconds``, and whether it ``halted`` early."""

    out: str
    steps: int
    positions: int
    final_loss: float
    eval: dict[str, float] | None
    seconds: float
    halted: bool = False

    def render(self) -> str:
        """The one line ``train-student`` prints."""
        if self.halted:
            return f"{self.out}: halted after step {self.steps} (--halt-after) with a checkpoint; rerun with --resume to continue."
        evaluated = ""
        if self.eval:
            evaluated = "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items())
        return (
            f"{self.out}: {self.steps} steps, {self.positions:,} positions, final loss {self.final_loss:.4f}{evaluated}; "
            f"{self.seconds:.1f} s. Student: {self.out}/student.safetensors (spec in student.json)."
        )


class MetricsLog:
    """``metrics.jsonl``: appended on local disk; on an object store (no append) the whole small
    object is written again with each record. A line torn by a crash is dropped when a resumed run
    opens the file, and a torn tail never swallows the next record (``append_line``)."""

    def __init__(self, location: Location, step: int) -> None:
        self.location = location
        self.lines: list[str] = []
        if location.is_file():  # a resumed run: drop records past the checkpoint, so it reads as one run
            for line in location.read_bytes().decode("utf-8", errors="replace").splitlines():
                record = _metrics_record(line)
                if record is not None and record.get("step", 0) <= step:
                    self.lines.append(line)
            self._write_all()

    def _write_all(self) -> None:
        if self.location.local:
            atomic_write_text(self.location.local_path, "".join(line + "\n" for line in self.lines))
        else:
            self.location.write_bytes("".join(line + "\n" for line in self.lines).encode())

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        self.lines.append(line)
        if self.location.local:
            append_line(self.location.local_path, line, durable=False)
        else:
            self._write_all()


def _metrics_record(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line's record, or None for a torn or damaged line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
        return None
    return record
