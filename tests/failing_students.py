"""A test-only student that fails mid-training, and an entry point that reports what a failed
``train_student`` leaves behind in its process (run it under torchrun).

``failing_students:raising_student`` is digits_mlp-shaped (64 features -> 10 classes); tests/ is on
``sys.path`` under pytest and on ``PYTHONPATH`` in the subprocess tests.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RAISE_AT", "FAILURE", "RaisingStudent", "raising_student", "main"]

RAISE_AT = 3
"""The forward with gradients (a training step's; probe and eval forwards run without) that raises."""

FAILURE = "the student failed on purpose"


class RaisingStudent(nn.Module):
    """Linear(64, 10) whose RAISE_AT-th forward with gradients enabled raises RuntimeError(FAILURE)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.training_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.training_calls += 1
            if self.training_calls == RAISE_AT:
                raise RuntimeError(f"{FAILURE} (training forward {self.training_calls})")
        return self.linear(x)


def raising_student() -> nn.Module:
    return RaisingStudent()


def _marker(signum: int, frame: Any) -> None:
    """A handler of our own, so that its return after train_student is visible."""


def main(argv: list[str]) -> int:
    """``python -m failing_students DATA_DIR OUT REPORT_DIR``: train raising_student; on its failure
    write REPORT_DIR/rank-R.json (the error, whether our SIGINT/SIGTERM handlers are back, whether
    the process group is still initialised) and exit 3."""
    from softlabels.distributed import distributed_env
    from softlabels.options import TrainConfig
    from softlabels.train import train_student

    data, out, reports = argv
    signal.signal(signal.SIGINT, _marker)
    signal.signal(signal.SIGTERM, _marker)
    config = TrainConfig(data=[data], student="failing_students:raising_student", out=out, max_steps=8, batch_size=8, progress=False)
    try:
        train_student(config)
    except RuntimeError as exc:
        report = {
            "error": str(exc),
            "sigint_restored": signal.getsignal(signal.SIGINT) is _marker,
            "sigterm_restored": signal.getsignal(signal.SIGTERM) is _marker,
            "group_initialized": torch.distributed.is_initialized(),
        }
        Path(reports, f"rank-{distributed_env().rank}.json").write_text(json.dumps(report))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
