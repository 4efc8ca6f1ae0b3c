"""What ``train-student`` keeps in ``--out``: the checkpoint (save, load, the resume check) and the
student files (``student.safetensors`` with byte-stable metadata, ``student.json``).

A checkpoint is model, optimizer, scheduler, step, loader positions and the settings a resume must
match; no RNG streams (the recipe re-seeds every step), so it is written with ``torch.save`` of
tensors and strings only and read back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..claim import check_output, claim_output, names_in
from ..options import TrainConfig, flag_of
from ..storage import Location, writing

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "OUTPUT_NAMES", "canonical_safetensors", "check_out", "check_resume", "is_output_name",
           "discard_partial_outputs", "read_checkpoint", "write_checkpoint", "write_student"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
OUTPUT_NAMES = (CHECKPOINT_NAME, METRICS_NAME, "student.safetensors", "student.json")
"""Every file ``train-student`` writes in ``--out`` (and their ``.tmp`` names while writing)."""
COMMAND = "softlabels train-student"


def is_output_name(name: str) -> bool:
    """Is ``name`` a file train-student writes in ``--out`` (``OUTPUT_NAMES``, or one of them while written)?"""
    return name in OUTPUT_NAMES or (name.endswith(".tmp") and name.split(".tmp")[0].startswith(OUTPUT_NAMES))


def check_out(config: TrainConfig, lease: bool = False) -> Location:
    """``--out`` claimed (``claim.claim_output`` with ``lease``, else only checked): apart from every
    DATA_DIR/--data and --eval directory, holding only what train-student writes; a checkpoint there
    needs ``--resume``."""
    inputs = [(d, "the soft-label directory (DATA_DIR/--data)") for d in config.data]
    inputs += [(config.eval, "the --eval directory")] if config.eval else []
    claim = claim_output if lease else check_output
    out = claim(config.out, COMMAND, lambda place: next((n for n in names_in(place) if not is_output_name(n)), None), inputs)
    if (out / CHECKPOINT_NAME).is_file() and not config.resume:
        raise UserError(f"--out {out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    return out


def discard_partial_outputs(out: Location) -> None:
    """``NAME.PID.tmp`` files of train-student outputs, left by a run killed mid-write (local disk)."""
    if not out.local:
        return
    for name in out.listdir():
        if name.endswith(".tmp") and is_output_name(name):
            with writing(out / name, action="remove"):
                (out / name).delete()


def write_checkpoint(location: Location, state: dict[str, Any]) -> None:
    """``state`` (tensors, numbers and strings) to ``location`` with ``torch.save``, whole or not at all."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    location.write_bytes(buffer.getvalue())  # staged and renamed on local disk, one object on a store


def read_checkpoint(location: Location) -> dict[str, Any]:
    """The state ``write_checkpoint`` wrote, on the CPU (``weights_only=True``).

    Raises:
        UserError: an unreadable or damaged checkpoint, naming it.
    """
    try:
        return torch.load(io.BytesIO(location.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged checkpoint is the user's file
        raise UserError(f"--resume: cannot read {location} ({type(exc).__name__}: {exc})") from None


def check_resume(config: TrainConfig, recorded: dict[str, Any]) -> None:
    """Raises: UserError naming each flag whose value differs from the checkpoint's ``recorded`` settings."""
    ours = config.resume_settings()
    differences = [f"{_resume_flag(k)}: checkpoint has {recorded.get(k)!r}, this run {ours[k]!r}" for k in ours if recorded.get(k) != ours[k]]
    if differences:
        raise UserError(f"--resume: {config.out} was trained with different settings ({'; '.join(differences)})")


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata map in a random order per save (safetensors issue #584), so two
    identical students would differ in their header bytes. The tensors and their offsets, which are
    relative to the end of the header, are unchanged; the header is padded with spaces to 8 bytes.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def write_student(model: torch.nn.Module, out: Location, spec: str, manifest: dict[str, Any]) -> None:
    """OUT/student.safetensors (``canonical_safetensors``) and OUT/student.json: the SPEC to load it
    with (``spec@weights``), its factory, and the teachers and vocabulary it was distilled from."""
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="softlabels-student-") as scratch:
        staged = os.path.join(scratch, "student.safetensors")
        save_model(model, staged, metadata={"spec": spec})  # stores tied weights (LM heads) once
        (out / "student.safetensors").write_bytes(canonical_safetensors(Path(staged).read_bytes()))
    record = {"spec": f"{spec}@{(out / 'student.safetensors').uri}", "factory": spec,
              "teachers": manifest["teachers"], "vocab_size": manifest["vocab_size"]}
    (out / "student.json").write_bytes((json.dumps(record, indent=2) + "\n").encode())


def _resume_flag(name: str) -> str:
    """The flag (or launcher setting) a resume setting comes from, for error messages."""
    if name == "world_size":
        return "torchrun --nproc-per-node"
    if name == "data":
        return "DATA_DIR/--data"
    return flag_of(TrainConfig, name)
