"""Loading a weights file into a built model: safetensors, or a ``.pt`` state dict read with
``weights_only=True``. Used by every model source (factories, ``hf:`` directories), teachers and
students alike; it imports no model source.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

__all__ = ["load_weights", "require_file"]


def require_file(path: Path, spec: str, what: str, flag: str = "--teacher") -> None:
    """Refuse a missing PATH in one line naming FLAG and SPEC."""
    if not path.is_file():
        raise UserError(f"{flag} {spec}: {what} {path} does not exist")


def load_weights(module: torch.nn.Module, path: Path, spec: str, flag: str = "--teacher") -> None:
    """Load a safetensors file or a ``.pt`` state dict (weights_only) into ``module``, strictly."""
    require_file(path, spec, "weights file", flag)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_model

            load_model(module, str(path), strict=True)  # knows tied weights saved once
        elif path.suffix in (".pt", ".pth", ".bin"):
            module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        else:
            raise UserError(f"{flag} {spec}: weights must be .safetensors or .pt, not {path.name}")
    except UserError:
        raise
    except Exception as exc:  # any reader or shape error is a bad weights file for the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{flag} {spec}: cannot load weights {path}: {first_line}") from None
