"""A test-only teacher that parks a run mid-way until the test lets it go (a hook, not a sleep).

With ``SOFTLABELS_TEST_GATE=DIR`` in its environment, the factory appends its process id to
``DIR/loaded``, and the teacher's ``GATE_AT``-th forward (the first after the vocabulary probe)
creates ``DIR/entered`` and waits for ``DIR/release``. Without it, it is ``digits_mlp``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from softlabels.models import digits_mlp

GATE_ENV = "SOFTLABELS_TEST_GATE"
GATE_AT = 2
WAIT_S = 120.0


class Gated(nn.Module):
    """Wraps a model; its outputs are the wrapped model's."""

    def __init__(self, inner: nn.Module, gate: Path | None) -> None:
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.calls = 0

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.gate is not None and self.calls == GATE_AT:
            (self.gate / "entered").touch()
            deadline = time.monotonic() + WAIT_S
            while not (self.gate / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        return self.inner(*args)


def gated_digits() -> nn.Module:
    gate = Path(os.environ[GATE_ENV]) if os.environ.get(GATE_ENV) else None
    if gate is not None:
        with open(gate / "loaded", "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
    return Gated(digits_mlp(), gate)
