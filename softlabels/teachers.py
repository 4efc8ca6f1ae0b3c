"""Loading teachers (and students) from a SPEC, and calling them by the convention of DESIGN.md.

SPEC forms:

* ``path/model.pt2``: a ``torch.export`` program, self-contained;
* ``package.module:factory`` or ``package.module:factory@weights.safetensors`` (or ``@weights.pt``,
  read with ``weights_only=True``): a factory returning an ``nn.Module``;
* ``hf:DIR``: a local Hugging Face transformers directory (extra ``[hf]``).

A teacher's identity is the sha256 of its weights (the .pt2 file, the weights file, or for a bare
factory the source file that defines it), so a run's fingerprint changes exactly when the numbers
the teacher would produce can change.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .inputs import TeacherInputs
from .storage import sha256_file

__all__ = ["Teacher", "autocast", "load_model", "load_teacher", "load_weights", "portable_name", "resolve_device"]


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

    def logits(self, inputs: TeacherInputs) -> torch.Tensor:
        """Call the model; logits [B, C] or [B, T, C] in the model's dtype."""
        if inputs.lengths is None:
            output = self.module(inputs.x)
        else:
            output = self.module(inputs.x, inputs.lengths)
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


def portable_name(spec: str) -> str:
    """A SPEC without the machine's directories: what a shard header may record of a teacher.

    ``/home/me/models/t.pt2`` -> ``t.pt2``; ``pkg.mod:factory@/abs/w.safetensors`` ->
    ``pkg.mod:factory@w.safetensors``; ``hf:/abs/SmolLM2`` -> ``hf:SmolLM2``. The teacher's identity
    is its sha256, recorded beside this name.
    """
    def leaf(path: str) -> str:
        return Path(path).name or path

    if spec.startswith("hf:"):
        target, at, weights = spec[len("hf:"):].partition("@")
        return "hf:" + leaf(target.rstrip("/")) + (at + leaf(weights) if at else "")
    if spec.endswith(".pt2"):
        return leaf(spec)
    target, at, weights = spec.partition("@")
    return target + (at + leaf(weights) if at else "")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` (this process's LOCAL_RANK GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` for ``--precision bf16``, a disabled one for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _require_file(path: Path, spec: str, what: str, flag: str = "--teacher") -> None:
    if not path.is_file():
        raise UserError(f"{flag} {spec}: {what} {path} does not exist")


def load_weights(module: torch.nn.Module, path: Path, spec: str, flag: str = "--teacher") -> None:
    """Load a safetensors file or a ``.pt`` state dict (weights_only) into ``module``, strictly."""
    _require_file(path, spec, "weights file", flag)
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


def _build_factory(spec: str, flag: str, trained: bool) -> tuple[torch.nn.Module, str]:
    target, _, weights = spec.partition("@")
    module_name, _, factory_name = target.partition(":")
    if not module_name or not factory_name:
        raise UserError(f"{flag} {spec}: expected package.module:factory[@weights]")
    try:
        python_module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag} {spec}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # the user's module raised on import: its line, not our traceback
        raise UserError(f"{flag} {spec}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    factory = getattr(python_module, factory_name, None)
    if not callable(factory):
        raise UserError(f"{flag} {spec}: {module_name} has no callable {factory_name}")
    try:
        model = factory()
    except Exception as exc:
        raise UserError(f"{flag} {spec}: {factory_name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{flag} {spec}: {factory_name}() returned {type(model).__name__}, not an nn.Module")
    if weights:
        path = Path(weights)
        load_weights(model, path, spec, flag)
        digest = sha256_file(path)
    else:
        if trained and _randomly_initialised(factory, model):
            raise UserError(
                f"{flag} {spec}: {factory_name}() builds randomly initialised weights (two builds differ) and no "
                f"@weights file is given; use {spec}@weights.safetensors"
            )
        source = inspect.getsourcefile(python_module)
        text = Path(source).read_bytes() if source else spec.encode()
        digest = hashlib.sha256(text + factory_name.encode()).hexdigest()
    return model, digest


def _randomly_initialised(factory: Callable[[], Any], model: torch.nn.Module) -> bool:
    """Does a second build under another RNG seed give other weights? (A factory that loads its own
    weights builds the same model every time.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        again = factory()
    theirs = again.state_dict() if isinstance(again, torch.nn.Module) else {}
    return any(not torch.equal(value, theirs[name]) for name, value in model.state_dict().items()
               if name in theirs and value.is_floating_point() and value.shape == theirs[name].shape)


def load_model(spec: str, flag: str = "--teacher", trained: bool = False) -> tuple[Any, str]:
    """The model object named by SPEC (on the CPU) and its sha256 identity.

    Args:
        flag: the option SPEC came from, named in every error.
        trained: refuse a factory without ``@weights`` whose weights are random (a teacher must be trained).
    """
    if spec.startswith("hf:"):
        from .hf import load_hf_model

        return load_hf_model(spec, flag)
    if spec.endswith(".pt2"):
        path = Path(spec)
        _require_file(path, spec, "exported program")
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # a damaged archive is the user's file, not our bug
            raise UserError(f"{flag} {spec}: cannot load exported program ({type(exc).__name__}: {exc})") from None
        return program.module(), sha256_file(path)
    if ":" in spec:
        return _build_factory(spec, flag, trained)
    path = Path(spec)
    if path.exists():
        raise UserError(f"{flag} {spec}: unknown model file type; expected .pt2, module:factory[@weights] or hf:DIR")
    raise UserError(f"{flag} {spec}: no such file, and not of the form module:factory[@weights] or hf:DIR")


def load_teacher(spec: str, device: torch.device) -> Teacher:
    """Load a teacher for inference on ``device``: eval mode, no gradients."""
    model, digest = load_model(spec, "--teacher", trained=True)
    if isinstance(model, torch.nn.Module):
        if not isinstance(model, torch.fx.GraphModule):
            model.eval()  # an exported program's module has no train/eval switch; it was exported in eval
        model.requires_grad_(False)
        model = model.to(device)
    return Teacher(spec=spec, sha256=digest, module=model)
