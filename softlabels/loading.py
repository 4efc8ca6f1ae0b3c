"""Loading a model, teacher or student, from a SPEC (DESIGN.md section 3).

SPEC forms:

* ``path/model.pt2``: a ``torch.export`` program, self-contained;
* ``package.module:factory`` or ``package.module:factory@weights.safetensors`` (or ``@weights.pt``,
  read with ``weights_only=True``): a factory returning an ``nn.Module``;
* ``hf:DIR``: a local Hugging Face transformers directory (extra ``[hf]``, softlabels.hf).

A model's identity is the sha256 of its weights (the .pt2 file, the weights file, or for a bare
factory the source file that defines it), so a run's fingerprint changes exactly when the numbers
the model would produce can change.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .hf import load_hf_model
from .storage import sha256_file
from .weights import load_weights, require_file

__all__ = ["load_model", "portable_name"]


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
        return load_hf_model(spec, flag)
    if spec.endswith(".pt2"):
        path = Path(spec)
        require_file(path, spec, "exported program")
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
