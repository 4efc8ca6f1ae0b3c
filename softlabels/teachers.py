"""Teachers: a loaded model (softlabels.loading) ready for inference, called by the convention of
DESIGN.md (``model(x)`` or ``model(x, lengths)``, logits [B, C] or [B, T, C])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import UserError
from .inputs import TeacherInputs
from .loading import load_model

__all__ = ["Teacher", "load_teacher"]


@dataclass
class Teacher:
    """A loaded model ready for inference.

    Attributes:
        spec: the SPEC string as the user gave it.
        sha256: identity of the weights (see module docstring).
        module: the callable model, on its device, in eval mode.
    """

    spec: str
    sha256: str
    module: Callable[..., Any]

    def call(self, inputs: TeacherInputs) -> Any:
        """The model's own output: ``model(x)``, or ``model(x, lengths)`` for sequences and audio."""
        if inputs.lengths is None:
            return self.module(inputs.x)
        return self.module(inputs.x, inputs.lengths)

    def logits(self, inputs: TeacherInputs) -> torch.Tensor:
        """Call the model; logits [B, C] or [B, T, C] in the model's dtype."""
        output = self.call(inputs)
        if hasattr(output, "logits"):
            output = output.logits
        elif isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise UserError(f"--teacher {self.spec}: expected logits [B, C] or [B, T, C], got {shape}")
        if output.shape[0] != inputs.x.shape[0]:
            raise UserError(
                f"--teacher {self.spec}: returned logits for {output.shape[0]} rows from a batch of {inputs.x.shape[0]} "
                f"(inputs {tuple(inputs.x.shape)}); the input column does not fit this model"
            )
        return output


def load_teacher(spec: str, device: torch.device) -> Teacher:
    """Load a teacher for inference on ``device``: eval mode, no gradients."""
    model, digest = load_model(spec, "--teacher", trained=True)
    if isinstance(model, torch.nn.Module):
        if not isinstance(model, torch.fx.GraphModule):
            model.eval()  # an exported program's module has no train/eval switch; it was exported in eval
        model.requires_grad_(False)
        model = model.to(device)
    return Teacher(spec=spec, sha256=digest, module=model)
