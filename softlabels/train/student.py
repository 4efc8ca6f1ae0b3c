"""The student ``train-student`` trains: built from ``--student SPEC`` and probed on one batch."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..loading import load_model
from .objective import student_logits

__all__ = ["load_student", "output_classes"]


def load_student(spec: str) -> tuple[torch.nn.Module, str]:
    """The trainable student of ``--student SPEC`` and its factory (the SPEC without weights)."""
    model, _ = load_model(spec, "--student")
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise UserError(f"--student {spec}: a student must be a trainable module (module:factory, hf:DIR or hf:CONFIG)")
    return model, spec.partition("@")[0]


def output_classes(model: torch.nn.Module, probe: dict[str, Any], device: torch.device, spec: str) -> int:
    """V of the student's logits on ``probe``; a forward that rejects the data's calling convention is a UserError."""
    try:
        with torch.no_grad():
            return student_logits(model, probe, device).shape[-1]
    except UserError:
        raise
    except Exception as exc:  # the user's student rejected the calling convention of the data
        shape = f"inputs {tuple(probe['inputs'].shape)}" + (", lengths [B]" if "lengths" in probe else "")
        raise UserError(f"--student {spec}: forward failed on {shape}: {type(exc).__name__}: {exc}") from None
