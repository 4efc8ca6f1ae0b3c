"""``softlabels init-student``: a same-family student that starts from a subset of the teacher's layers.

DistilBERT's initialisation (Sanh et al., 2019): the student has the teacher's architecture with
half the layers, and student layer i starts as teacher layer 2i ("every other layer"). Everything
outside the layer stack (embeddings, final norm, LM or classification head) is copied unchanged.

The layer stack is found, not named: it is the outermost ``nn.ModuleList`` holding exactly
``config.num_hidden_layers`` modules (``model.layers`` of Llama-family causal LMs such as SmolLM2,
``bert.encoder.layer``, ``distilbert.transformer.layer``, ``transformer.h``). A model with no such
list, or with several (an encoder-decoder), is refused.

The command writes a ``save_pretrained`` directory (config.json with the new layer count,
model.safetensors), the teacher's tokenizer (its tokenizer files copied byte for byte; from a
``.gguf`` teacher, the tokenizer it holds, saved with ``save_pretrained``) and ``init.json``: which teacher layer each student layer came from, and the
teacher's sha256 (its identity, as recorded in soft-label manifests). Train it with
``train-student --student hf:OUT``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import UserError
from .options import InitStudentConfig
from .claim import claim_output, names_in
from .lease import lease_scope
from .storage import Location, atomic_write_text, fsync_path, is_uri, os_error_reason

__all__ = ["INIT_RECORD_NAME", "InitStudentSummary", "every_other_layer", "find_layer_list", "halve_layers", "init_student", "select_layers"]

INIT_RECORD_NAME = "init.json"
STAGING_NAME = ".init-student.tmp"
"""Inside --out: the files being written, and ``files.json`` naming what a publish may leave behind."""
"""The record ``init-student`` writes last in ``--out``; it lists every other file it wrote."""


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and module of the model's one stack of ``config.num_hidden_layers`` layers.

    Raises:
        UserError: the model has no ``config.num_hidden_layers``, no ModuleList of that length, or
            several that are not nested in one another.
    """
    kind = type(model).__name__
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UserError(f"cannot find the layer list of {kind}: it has no config.num_hidden_layers")
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count]
    outermost = [(name, module) for name, module in lists
                 if not any(other != name and name.startswith(other + ".") for other, _ in lists)]
    if len(outermost) != 1:
        found = ", ".join(name for name, _ in outermost) or "none"
        raise UserError(f"cannot find the layer list of {kind}: it needs exactly one ModuleList of {count} layers "
                        f"(config.num_hidden_layers), found {found}")
    return outermost[0]


def every_other_layer(count: int) -> list[int]:
    """Teacher layers 0, 2, 4, ... of ``count``: ceil(count / 2) of them, DistilBERT's choice."""
    return list(range(0, count, 2))


def select_layers(model: nn.Module, teacher_layers: Sequence[int]) -> nn.Module:
    """A new model of the same class and config whose layer i is a copy of ``teacher_layers[i]``.

    Every parameter and persistent buffer outside the layer stack is copied (tied weights stay
    tied); ``config.num_hidden_layers`` (and a per-layer ``config.layer_types``) follows the
    selection. The teacher is not modified; the student has the teacher's dtype and train/eval mode.

    Raises:
        UserError: no layer list (see ``find_layer_list``), or ``teacher_layers`` empty, out of
            range, or not strictly increasing.
    """
    prefix, layers = find_layer_list(model)
    count = len(layers)
    chosen = [int(index) for index in teacher_layers]
    if not chosen or any(not 0 <= index < count for index in chosen) or any(a >= b for a, b in itertools.pairwise(chosen)):
        raise UserError(f"layers {','.join(map(str, chosen)) or '(none)'}: need strictly increasing layer numbers "
                        f"from 0 to {count - 1} ({type(model).__name__} has {count} layers)")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(chosen)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == count:
        config.layer_types = [layer_types[index] for index in chosen]
    reference = next(model.parameters())
    with torch.device(reference.device):
        student = type(model)(config)
    student = student.to(reference.dtype)
    teacher_state = model.state_dict()
    layer_prefix = prefix + "."
    state: dict[str, torch.Tensor] = {}
    try:
        for name in student.state_dict():
            if name.startswith(layer_prefix):
                index, _, rest = name[len(layer_prefix):].partition(".")
                state[name] = teacher_state[f"{layer_prefix}{chosen[int(index)]}.{rest}"]
            else:
                state[name] = teacher_state[name]
        student.load_state_dict(state, strict=True)  # copies into the student's own (tied) parameters
    except (KeyError, RuntimeError) as exc:  # something besides the layer list depends on the layer count
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot copy {type(model).__name__}'s weights outside {prefix} into a {len(chosen)}-layer model ({first})") from None
    student.train(model.training)
    return student


def halve_layers(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """DistilBERT's student: every other layer of ``model``; returns (student, layer_map) where
    student layer i started as teacher layer ``layer_map[i]``."""
    _, layers = find_layer_list(model)
    layer_map = every_other_layer(len(layers))
    return select_layers(model, layer_map), layer_map


@dataclass(frozen=True)
class InitStudentSummary:
    """What ``init-student`` wrote; ``render()`` is the line the CLI prints."""

    out: str
    teacher: str
    layer_map: list[int]
    teacher_layers: int
    parameters: int

    def render(self) -> str:
        return (f"{self.out}: a {len(self.layer_map)}-layer student ({self.parameters:,} parameters) from layers "
                f"{','.join(map(str, self.layer_map))} of the {self.teacher_layers}-layer {self.teacher}; "
                f"record in {INIT_RECORD_NAME}. Train it with --student hf:{self.out}")


def _foreign(out: Location) -> str | None:
    """init-student writes only ``init.json``, the files it lists, and while it publishes its staging
    folder (whose ``files.json`` names what it may have left in --out): the first other name, or None."""
    names = names_in(out)
    if not names:
        return None
    ours = {INIT_RECORD_NAME, STAGING_NAME}
    for record in (out / INIT_RECORD_NAME, out / STAGING_NAME / "files.json"):
        try:
            ours |= set(json.loads(record.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    foreign = [name for name in names if name not in ours]
    if foreign or not {INIT_RECORD_NAME, STAGING_NAME} & set(names):
        return (foreign or names)[0]
    return None


def _claim_out(out: str, teacher: str) -> Path:
    """``--out`` is a local directory, apart from the teacher's, that is new, empty, or a previous
    init-student output; claimed (with the lease) until the command ends."""
    if is_uri(out):
        raise UserError(f"--out {out}: init-student writes a local directory (hf: specs load local directories only)")
    teacher_path = Path(teacher[len("hf:"):].partition("@")[0])
    what = "the --teacher directory" if teacher_path.is_dir() else "the --teacher file"
    inputs = [(teacher_path, what)] if teacher_path.exists() else []
    return claim_output(out, "softlabels init-student", _foreign, inputs).local_path


def _tokenizer_files(teacher: str) -> tuple[list[Path], Any]:
    """The teacher's tokenizer: (its files to copy, none for a .gguf) and (the tokenizer loaded from a .gguf, else None)."""
    from .text import TokenizerSource, load_tokenizer

    source = TokenizerSource.of(teacher, "--teacher")
    files = source.files()
    if files and files[0].suffix == ".gguf":
        return [], load_tokenizer(source)
    return files, None


def _write(student: nn.Module, path: Path, record: dict[str, Any], tokenizer: tuple[list[Path], Any] = ([], None)) -> None:
    """Write the student into --out (never outside it), ``init.json`` last: a directory without it is
    incomplete (a rerun finishes it), and config.json only appears once every weight file has."""
    staging = path / STAGING_NAME
    try:
        _stage(student, staging, tokenizer)
        _publish(path, staging, record)
    except BaseException as exc:  # a full or read-only disk, Ctrl-C: init.json is not written
        if not (staging / "files.json").exists():  # once publishing began, files.json tells a rerun what is ours
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {os_error_reason(exc)}") from None
        raise


def _stage(student: nn.Module, staging: Path, tokenizer: tuple[list[Path], Any]) -> None:
    """save_pretrained and the teacher's tokenizer into ``--out/.init-student.tmp``, with the umask's mode, fsync'd."""
    if staging.exists():
        shutil.rmtree(staging)  # an interrupted earlier run's staged files
    student.save_pretrained(str(staging))
    files, loaded = tokenizer
    for file in files:
        shutil.copyfile(file, staging / file.name)
    if loaded is not None:
        loaded.save_pretrained(str(staging))
    probe = staging / ".mode"
    probe.touch()
    mode = probe.stat().st_mode & 0o777  # the umask's, not save_pretrained's 0600
    probe.unlink()
    for file in staging.iterdir():
        file.chmod(mode)
        fsync_path(file)


def _publish(path: Path, staging: Path, record: dict[str, Any]) -> None:
    """Move the staged files into --out, replacing a previous init-student output: its record goes first,
    config.json comes last of the model files, and the new record is written after them."""
    new = sorted(p.name for p in staging.iterdir())
    old: list[str] = []
    if (path / INIT_RECORD_NAME).is_file():
        old = json.loads((path / INIT_RECORD_NAME).read_text()).get("files", [])
    atomic_write_text(staging / "files.json", json.dumps({"files": sorted(set(new) | set(old))}) + "\n")
    (path / INIT_RECORD_NAME).unlink(missing_ok=True)  # from here on --out reads as incomplete
    for name in sorted(set(old) - set(new)):
        (path / name).unlink(missing_ok=True)
    for name in sorted(new, key=lambda n: n == "config.json"):
        os.replace(staging / name, path / name)
    record["files"] = new
    atomic_write_text(path / INIT_RECORD_NAME, json.dumps(record, indent=2) + "\n")  # written and fsync'd
    shutil.rmtree(staging)
    fsync_path(path)


@lease_scope
def init_student(config: InitStudentConfig) -> InitStudentSummary:
    """Write an ``hf:`` student directory initialised from the teacher's layers (see module docstring).

    Raises:
        UserError: a teacher that is not ``hf:`` or has no layer list, bad ``--layers``, or an
            ``--out`` holding files init-student did not write; ``lease.LeaseHeld`` (a ``UserError``)
            while another writer holds ``--out``.
    """
    from .hf import disable_progress_bars, load_hf_model
    from .loading import portable_name

    if not config.teacher.startswith("hf:"):
        raise UserError(f"--teacher {config.teacher}: init-student needs an hf: teacher (a transformers directory or a .gguf)")
    path = _claim_out(config.out, config.teacher)
    if not config.progress:
        disable_progress_bars()
    wrapped, sha256 = load_hf_model(config.teacher, "--teacher")
    teacher = wrapped.model
    try:
        prefix, layers = find_layer_list(teacher)
    except UserError as exc:
        raise UserError(f"--teacher {config.teacher}: {exc}") from None
    teacher_layers = len(layers)
    if config.teacher_layers is None:
        layer_map = every_other_layer(teacher_layers)
    elif config.teacher_layers[-1] >= teacher_layers:
        raise UserError(f"--layers {config.layers}: the teacher {portable_name(config.teacher)} has layers 0 to {teacher_layers - 1}")
    else:
        layer_map = list(config.teacher_layers)
    student = select_layers(teacher, layer_map)
    tokenizer = _tokenizer_files(config.teacher)
    record = {
        "written_by": f"softlabels {__version__} init-student",
        "teacher": portable_name(config.teacher),
        "teacher_sha256": sha256,
        "layers": config.layers,
        "layer_list": prefix,
        "teacher_num_layers": teacher_layers,
        "student_num_layers": len(layer_map),
        "teacher_layer_of_student_layer": layer_map,
        "outside_layer_list": "copied unchanged from the teacher (embeddings, final norm, head)",
    }
    _write(student, path, record, tokenizer)
    return InitStudentSummary(str(config.out), portable_name(config.teacher), layer_map, teacher_layers,
                              sum(p.numel() for p in student.parameters()))
