"""Small reference models for the quickstart and the tests (torch only).

`digits_mlp` is the teacher and student architecture for scikit-learn's bundled digits
(8x8 images, 10 classes): Linear(64, 64) - GELU - Linear(64, 10), 4,810 parameters,
about 19 KB as fp32 safetensors.

Trade-off: width. The teachers train on only 150 labeled rows (the setting is
semi-supervised), so the labels are the bottleneck, not capacity. Widening the hidden layer
from 64 to 256 quadruples the parameters (4,810 -> 19,210; 19 KB -> 77 KB per safetensors
file) and buys 0.25 points of mean teacher test accuracy (88.9% -> 89.1%; 3 splits x 3
teachers, 300 full-batch AdamW steps); narrowing it to 16 (1,210 parameters) costs 0.4 points.
Width 64 keeps each committed teacher small and leaves the gap below 100% that distilling on
the unlabeled corpus is meant to close.

Use it as a teacher or student SPEC: ``softlabels.models:digits_mlp@weights.safetensors``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["digits_mlp", "DIGITS_FEATURES", "DIGITS_CLASSES"]

DIGITS_FEATURES: int = 64
"""Input width: the 8x8 pixels of a digits image, flattened row-major, scaled to [0, 1] (/16)."""

DIGITS_CLASSES: int = 10
"""Output width: one logit per digit 0-9."""

_DIGITS_HIDDEN: int = 64


def digits_mlp() -> nn.Module:
    """Build the reference MLP for scikit-learn digits, freshly initialised.

    Architecture: ``Linear(64, 64) - GELU - Linear(64, 10)`` as an ``nn.Sequential``, so the
    state-dict keys are ``0.weight`` [64, 64], ``0.bias`` [64], ``2.weight`` [10, 64] and
    ``2.bias`` [10]; the committed teachers in ``data/teachers/`` load into it with
    ``strict=True``. Seed with ``torch.manual_seed`` before calling for a reproducible init.

    Returns:
        An ``nn.Module`` in training mode, float32 on the CPU, mapping pixels float32
        ``[B, 64]`` (values in [0, 1]) to logits float32 ``[B, 10]``.
    """
    return nn.Sequential(
        nn.Linear(DIGITS_FEATURES, _DIGITS_HIDDEN),
        nn.GELU(),
        nn.Linear(_DIGITS_HIDDEN, DIGITS_CLASSES),
    )
