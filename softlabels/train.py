"""``softlabels train-student``: distil a student from stored soft labels, resumably.

Thin orchestration over tested parts: ``SoftLabelDataset`` streams batches, ``kd_loss`` and
``hard_label_loss`` make the objective ``alpha * KD + (1 - alpha) * CE``, AdamW with linear warmup and
cosine decay, gradient clipping, optional bf16 autocast, DDP under torchrun (gloo on CPU, nccl on
GPU). ``DistillationRecipe`` holds the pieces (setup, one step, evaluation, checkpoints, cleanup);
``train_student`` drives them.

Stored targets of either kind: top-k directories take ``kd_loss_per_position`` (``--tail``), sampled
ones (header ``targets: sample``) the RS-KD estimate at their header's proposal temperature, chosen
per batch (``stored_kd_per_position``), so top-k and sampled directories can be mixed (``--data``,
``--mix``) and either kind can be the ``--eval`` directory: each batch is scored against its own
directory's targets. The sampled estimate is unbiased at ``--temperature`` 1 or the proposal
temperature; at any other T it is only consistent, which ``train-student`` says on stderr.

Exact resume without saving RNG streams: the random state is re-seeded at every step from
(seed, step, rank), the loaders resume at the batch after the last one consumed, and the source
of each step's batch (when mixing several directories) is drawn from (seed, step) alone. A
checkpoint is then just model, optimizer, scheduler, step and loader positions; training N steps
straight and N/2 + resume + N/2 give the same losses, which the tests check.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .data import SoftLabelDataset, SoftLabelLoader
from .distributed import autocast, distributed_env, resolve_device
from .errors import NotSealedError, UserError, VerificationError
from .hf import disable_progress_bars
from .inputs import TeacherInputs
from .lease import is_lease_name, lease_scope, take_lease
from .losses import IGNORE_INDEX, dense_kd_per_position, hard_label_loss
from .options import TrainConfig, flag_of
from .rundir import refuse_out_inside_data
from .storage import Location, append_line, atomic_write_text, writing
from .loading import load_model
from .targets import kind_of_batch
from .teachers import Teacher, load_teacher

__all__ = ["TrainConfig", "TrainSummary", "DistillationRecipe", "train_student", "evaluate", "student_logits", "hard_labels",
           "batch_losses", "stored_kd_per_position", "teacher_top1", "MetricsLog", "canonical_safetensors"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
OUTPUT_NAMES = (CHECKPOINT_NAME, METRICS_NAME, "student.safetensors", "student.json")
"""Every file ``train-student`` writes in ``--out`` (and their ``.tmp`` names while writing)."""


def _resume_flag(name: str) -> str:
    if name == "world_size":
        return "torchrun --nproc-per-node"
    if name == "data":
        return "DATA_DIR/--data"
    return flag_of(TrainConfig, name)


@dataclass
class TrainSummary:
    out: str
    steps: int
    positions: int
    final_loss: float
    eval: dict[str, float] | None
    seconds: float
    halted: bool = False

    def render(self) -> str:
        if self.halted:
            return f"{self.out}: halted after step {self.steps} (--halt-after) with a checkpoint; rerun with --resume to continue."
        evaluated = ""
        if self.eval:
            evaluated = "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in self.eval.items())
        return (
            f"{self.out}: {self.steps} steps, {self.positions:,} positions, final loss {self.final_loss:.4f}{evaluated}; "
            f"{self.seconds:.1f} s. Student: {self.out}/student.safetensors (spec in student.json)."
        )


# -- model calls and losses --------------------------------------------------------------------


def student_logits(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Call the student by the teacher convention; logits [B, T, V] aligned with the soft labels."""
    inputs = TeacherInputs(batch["inputs"].to(device), batch["lengths"].to(device) if "lengths" in batch else None)
    output = model(inputs.x) if inputs.lengths is None else model(inputs.x, inputs.lengths)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 2:
        output = output.unsqueeze(1)
    steps = batch["mask"].shape[1]
    if output.shape[1] < steps:
        raise UserError(f"--student returns {output.shape[1]} positions but the soft labels have {steps}")
    return output[:, :steps]


def hard_labels(batch: dict[str, Any], next_token: bool, steps: int) -> torch.Tensor | None:
    """Hard labels [B, T] aligned with the positions, or None when the data has none."""
    if "labels" in batch:
        labels = batch["labels"]
        if labels.dim() == 1:
            padded = torch.full((labels.shape[0], steps), IGNORE_INDEX, dtype=torch.int64)
            padded[:, 0] = labels
            return padded
        return labels[:, :steps]
    if next_token:
        tokens = batch["inputs"]
        labels = torch.full(tokens.shape[:2], IGNORE_INDEX, dtype=torch.int64)
        labels[:, :-1] = tokens[:, 1:]
        if "lengths" in batch:
            last = (batch["lengths"] - 1).clamp(min=0)
            labels[torch.arange(len(labels)), last] = IGNORE_INDEX  # the last token has no successor
        return labels[:, :steps]
    return None


def stored_kd_per_position(logits: torch.Tensor, batch: dict[str, Any], temperature: float, tail: str,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher_T || student_T) at each position against the batch's stored targets, without T^2.

    Top-k batches use ``kd_loss_per_position`` with ``--tail``; sampled batches (``sample_ids``) the
    RS-KD estimate ``sampled_kd_loss_per_position`` at the batch's ``proposal_temperature``.

    Args:
        logits: [M, V] student logits at the positions ``mask`` selects, or [B, T, V] when mask is None.
        mask: bool [B, T] selecting the targets' positions, or None to take every position.

    Returns:
        [M] or [B, T] per-position values in nats.
    """
    device = logits.device

    def pick(name: str) -> torch.Tensor:
        value = batch[name].to(device)
        return value if mask is None else value[mask]

    return kind_of_batch(batch).loss_per_position(logits, pick, batch, temperature, tail)


def teacher_top1(batch: dict[str, Any]) -> torch.Tensor:
    """int64 [B, T] the teacher's most probable stored class per position: top-k's first id, or the
    drawn id of largest teacher log-probability (0 at positions without targets)."""
    return kind_of_batch(batch).teacher_top1(batch)


def batch_losses(logits: torch.Tensor, batch: dict[str, Any], config: TrainConfig, next_token: bool,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: ``loss`` (to minimise), ``kd``, ``ce`` and counts.

    Only valid positions are gathered before the losses, so padding costs no [., V] work: with
    ragged sequences of 32-128 tokens that is about a third of the vocabulary-sized arithmetic.
    With ``teacher_logits`` [B, T, V] (online distillation) KD uses the full teacher distribution
    instead of the stored targets; otherwise top-k or sampled targets, as the batch holds
    (``stored_kd_per_position``).
    """
    device = logits.device
    mask = batch["mask"].to(device)
    valid_logits = logits[mask]
    if teacher_logits is not None:
        per_position = dense_kd_per_position(valid_logits, teacher_logits[mask], config.temperature)
    else:
        per_position = stored_kd_per_position(valid_logits, batch, config.temperature, config.tail, mask)
    valid = mask.sum()
    kd = per_position.sum() / valid.clamp(min=1) * config.temperature**2
    labels = hard_labels(batch, next_token, logits.shape[1])
    if labels is not None:
        valid_labels = labels.to(device)[mask]
        ce = hard_label_loss(valid_logits, valid_labels)
        labelled = (valid_labels != IGNORE_INDEX).sum()
    else:
        ce = logits.sum() * 0.0
        labelled = torch.zeros((), dtype=torch.int64, device=device)
    loss = config.alpha * kd + (1.0 - config.alpha) * ce
    return {"loss": loss, "kd": kd, "ce": ce, "positions": valid, "labelled": labelled}


# -- data ----------------------------------------------------------------------------------------


def _check_out(config: TrainConfig) -> Location:
    """``--out`` may hold only what train-student writes; a checkpoint there needs ``--resume``."""
    out = Location.of(config.out)
    out.require_bucket("--out")  # before any data is read or model built
    refuse_out_inside_data(out)
    if out.is_file():
        raise UserError(f"--out {out} exists and is not a directory")
    for name in out.listdir():
        if name not in OUTPUT_NAMES and not is_lease_name(name) and not (name.endswith(".tmp") and name.split(".tmp")[0].startswith(OUTPUT_NAMES)):
            raise UserError(f"--out {out} holds {name}, which train-student did not write; give an empty or new --out")
    if (out / CHECKPOINT_NAME).is_file() and not config.resume:
        raise UserError(f"--out {out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    for directory, flag in [(d, "DATA_DIR/--data") for d in config.data] + ([(config.eval, "--eval")] if config.eval else []):
        if out.same_as(directory):
            raise UserError(f"--out {out} is the soft-label directory {directory} ({flag}); choose another --out")
    return out


def _verify_inputs(config: TrainConfig) -> None:
    """Every --data and --eval directory is verified (sha256 of every shard) before step 1.

    Raises:
        UserError: a directory that does not exist or is not sealed, naming the flag.
        VerificationError: a damaged shard, naming the directory and the file (exit 2).
    """
    from .verify import verify

    checks = [(d, "DATA_DIR") for d in config.data] + ([(config.eval, "--eval")] if config.eval is not None else [])
    for directory, flag in checks:
        try:
            verify(directory)
        except NotSealedError as exc:  # the user's to finish, not damage
            raise UserError(f"{flag} {directory}: {exc}") from None
        except VerificationError as exc:
            raise VerificationError(f"{flag} {directory}: {exc}") from None
        except UserError as exc:
            raise UserError(f"{flag} {directory}: {exc}") from None


def _open_sources(config: TrainConfig, rank: int, world: int) -> list[SoftLabelDataset]:
    sources = []
    for index, directory in enumerate(config.data):
        try:
            sources.append(SoftLabelDataset(directory, batch_size=config.batch_size, shuffle=True, seed=config.seed + index,
                                            rank=rank, world_size=world, verify_sha256=False))  # verified up front
        except VerificationError as exc:
            raise UserError(f"data directory {directory}: {exc}") from None
        if not any(piece.rows for piece in sources[-1].pieces):  # e.g. a select that kept nothing
            raise UserError(f"data directory {directory}: holds no rows to train on")
    reference = sources[0].manifest
    for source, directory in zip(sources[1:], config.data[1:]):
        _check_same_teachers(reference, config.data[0], source.manifest, directory, "--data")
    return sources


def _check_same_teachers(reference: dict[str, Any], ref_dir: Path, other: dict[str, Any], other_dir: Path, flag: str) -> None:
    ours = [t["sha256"] for t in reference["teachers"]]
    theirs = [t["sha256"] for t in other["teachers"]]
    if ours != theirs or reference["vocab_size"] != other["vocab_size"]:
        raise UserError(
            f"{flag} {other_dir} was generated by different teachers than {ref_dir} "
            f"(sha256 {[s[:12] for s in theirs]} vs {[s[:12] for s in ours]}, vocab {other['vocab_size']} vs {reference['vocab_size']})"
        )


class _Stream:
    """An endless, resumable stream of batches from one source, epoch after epoch."""

    def __init__(self, dataset: SoftLabelDataset, num_workers: int) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.iterator: Iterator[dict[str, Any]] | None = None

    def _loader(self) -> Iterator[dict[str, Any]]:
        return iter(SoftLabelLoader(self.dataset, num_workers=self.num_workers))

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = self._loader()
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
                self.dataset.set_epoch(self.dataset.epoch + 1)
        raise UserError(f"{self.dataset.directory}: this rank's share of the data is empty")


def _source_of_step(seed: int, step: int, mix: list[float]) -> int:
    if len(mix) == 1:
        return 0
    return int(np.random.default_rng([seed, step, 7]).choice(len(mix), p=mix))


# -- the loop ------------------------------------------------------------------------------------


def _schedule(total_steps: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _seed_step(seed: int, step: int, rank: int) -> None:
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _load_student(spec: str) -> tuple[torch.nn.Module, str]:
    """The trainable student of ``--student SPEC`` and its factory (the SPEC without weights)."""
    model, _ = load_model(spec, "--student")
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise UserError(f"--student {spec}: a student must be a trainable module (module:factory, hf:DIR or hf:CONFIG)")
    return model, spec.partition("@")[0]


def _is_token_sequence(probe: dict[str, Any]) -> bool:
    """Token sequences without a label column: the hard label of position j is token j + 1."""
    inputs = probe["inputs"]
    return "labels" not in probe and inputs.dim() == 2 and not torch.is_floating_point(inputs) and probe["mask"].shape[1] > 1


def _output_classes(model: torch.nn.Module, probe: dict[str, Any], device: torch.device, spec: str) -> int:
    """V of the student's logits on ``probe``; a forward that rejects the data's calling convention is a UserError."""
    try:
        with torch.no_grad():
            return student_logits(model, probe, device).shape[-1]
    except UserError:
        raise
    except Exception as exc:  # the user's student rejected the calling convention of the data
        shape = f"inputs {tuple(probe['inputs'].shape)}" + (", lengths [B]" if "lengths" in probe else "")
        raise UserError(f"--student {spec}: forward failed on {shape}: {type(exc).__name__}: {exc}") from None


def _warn_biased_temperature(config: TrainConfig, sources: list[SoftLabelDataset], eval_set: SoftLabelDataset | None) -> None:
    """One stderr line per sampled directory whose proposal temperature makes the RS-KD estimate biased at --temperature."""
    pairs = list(zip(sources, config.data)) + ([(eval_set, config.eval)] if eval_set is not None else [])
    for source, directory in pairs:
        bias = source.kind.bias_warning(config.temperature, source.manifest)
        if bias is not None:
            print(f"warning: --temperature {bias} in {directory}: their KD estimate is then consistent, not unbiased", file=sys.stderr)


def _use_label_column(config: TrainConfig, sources: list[SoftLabelDataset], eval_set: SoftLabelDataset | None) -> None:
    """Read hard labels from ``--label-column`` in every data directory and the eval directory."""
    pairs = list(zip(sources, config.data)) + ([(eval_set, config.eval)] if eval_set is not None else [])
    for source, directory in pairs:
        if config.label_column not in source.columns():
            raise UserError(f"--label-column {config.label_column}: no such column in {directory} (columns: {', '.join(source.columns())})")
        source.label_column = config.label_column


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: SoftLabelDataset, config: TrainConfig, device: torch.device, next_token: bool) -> dict[str, float]:
    """KD loss, top-1 agreement with the teacher, and accuracy / CE against hard labels when present.

    On sampled targets ``eval_kd`` is the RS-KD estimate and the teacher's top-1 is the most probable
    drawn id (``teacher_top1``).
    """
    was_training = model.training
    model.eval()
    kd_sum = agree = positions = correct = labelled = 0.0
    ce_sum = 0.0
    dataset.set_epoch(0)
    for batch in dataset:
        with autocast(device, config.precision):
            logits = student_logits(model, batch, device)
        logits = logits.float()
        mask = batch["mask"].to(device)
        per_position = stored_kd_per_position(logits, batch, config.temperature, config.tail)
        kd_sum += float((per_position * mask).sum())
        prediction = logits.argmax(dim=-1)
        agree += float(((prediction == teacher_top1(batch).to(device)) & mask).sum())
        positions += float(mask.sum())
        labels = hard_labels(batch, next_token, logits.shape[1])
        if labels is not None:
            labels = labels.to(device).masked_fill(~mask, IGNORE_INDEX)
            has = labels != IGNORE_INDEX
            correct += float(((prediction == labels) & has).sum())
            labelled += float(has.sum())
            ce_sum += float(torch.nn.functional.cross_entropy(logits[has], labels[has], reduction="sum")) if bool(has.any()) else 0.0
    model.train(was_training)
    metrics = {"eval_kd": kd_sum / max(positions, 1) * config.temperature**2, "eval_top1_agreement": agree / max(positions, 1)}
    if labelled:
        metrics["eval_accuracy"] = correct / labelled
        metrics["eval_ce"] = ce_sum / labelled
        metrics["eval_perplexity"] = math.exp(min(ce_sum / labelled, 50.0))
    return metrics


class MetricsLog:
    """``metrics.jsonl``: appended on local disk; on an object store (no append) the whole small
    object is written again with each record. A line torn by a crash is dropped when a resumed run
    opens the file, and a torn tail never swallows the next record (``append_line``)."""

    def __init__(self, location: Location, step: int) -> None:
        self.location = location
        self.lines: list[str] = []
        if location.is_file():  # a resumed run: drop records past the checkpoint, so it reads as one run
            for line in location.read_bytes().decode("utf-8", errors="replace").splitlines():
                record = _metrics_record(line)
                if record is not None and record.get("step", 0) <= step:
                    self.lines.append(line)
            self._write_all()

    def _write_all(self) -> None:
        if self.location.local:
            atomic_write_text(self.location.local_path, "".join(line + "\n" for line in self.lines))
        else:
            self.location.write_bytes("".join(line + "\n" for line in self.lines).encode())

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        self.lines.append(line)
        if self.location.local:
            append_line(self.location.local_path, line, durable=False)
        else:
            self._write_all()


def _metrics_record(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line's record, or None for a torn or damaged line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
        return None
    return record


def _discard_partial_outputs(out: Location) -> None:
    """``NAME.PID.tmp`` files of train-student outputs, left by a run killed mid-write (local disk)."""
    if not out.local:
        return
    for name in out.listdir():
        if name.endswith(".tmp") and name.split(".tmp")[0].startswith(OUTPUT_NAMES):
            with writing(out / name, action="remove"):
                (out / name).delete()


def _save_checkpoint(location: Location, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    location.write_bytes(buffer.getvalue())  # staged and renamed on local disk, one object on a store


def _load_checkpoint(location: Location) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(location.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged checkpoint is the user's file
        raise UserError(f"--resume: cannot read {location} ({type(exc).__name__}: {exc})") from None


def _check_resume(config: TrainConfig, recorded: dict[str, Any]) -> None:
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


def _save_student(model: torch.nn.Module, out: Location, spec: str, manifest: dict[str, Any]) -> None:
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="softlabels-student-") as scratch:
        staged = os.path.join(scratch, "student.safetensors")
        save_model(model, staged, metadata={"spec": spec})  # stores tied weights (LM heads) once
        (out / "student.safetensors").write_bytes(canonical_safetensors(Path(staged).read_bytes()))
    record = {"spec": f"{spec}@{(out / 'student.safetensors').uri}", "factory": spec,
              "teachers": manifest["teachers"], "vocab_size": manifest["vocab_size"]}
    (out / "student.json").write_bytes((json.dumps(record, indent=2) + "\n").encode())


class DistillationRecipe:
    """One ``train-student`` run in pieces, as a torchtune recipe.

    ``setup()`` checks the inputs and builds everything (resuming from ``OUT/checkpoint.pt`` under
    ``--resume``); each step is ``train_step(next_batch())``; ``evaluate()``, ``save_checkpoint()``,
    ``load_checkpoint()`` and ``save_student()`` stand alone; ``train()`` is the loop
    ``train_student`` runs. ``cleanup()`` must follow on every exit path (a ``finally``): it restores
    the SIGINT/SIGTERM handlers ``train()`` installs and destroys the process group ``setup()``
    started. Driving the pieces by hand gives the weights ``train_student`` gives.

    Attributes set by ``setup``: ``model`` (the student), ``trained`` (``model``, DDP-wrapped under
    torchrun), ``optimizer``, ``scheduler``, ``sources`` (one dataset per DATA_DIR), ``eval_set``
    (None without ``--eval``), ``next_token`` (hard labels are the next tokens), ``total_steps``.
    ``step`` counts the optimizer steps taken.
    """

    out: Location
    device: torch.device
    sources: list[SoftLabelDataset]
    eval_set: SoftLabelDataset | None
    manifest: dict[str, Any]
    model: torch.nn.Module
    trained: torch.nn.Module
    factory_spec: str
    probe: dict[str, Any]
    vocab: int
    next_token: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    streams: list[_Stream]

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.env = distributed_env()
        self.started = time.perf_counter()
        self.step = 0
        self.positions_seen = 0
        self.last_loss = float("nan")
        self.metrics: MetricsLog | None = None
        self.online_teacher: Teacher | None = None
        self.group_started = False
        self.halt_signal: int | None = None
        self.bar: tqdm | None = None
        self._previous_handlers: dict[int, Any] | None = None
        self._window_start, self._window_positions = time.perf_counter(), 0

    @property
    def checkpoint_path(self) -> Location:
        return self.out / CHECKPOINT_NAME

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 1, in the order of its errors.

        Raises:
            UserError: bad settings, unusable data, a student/teacher vocabulary mismatch, or a
                ``--resume`` whose checkpoint was made with other settings.
            VerificationError: a damaged shard in a --data or --eval directory.
        """
        self._open_data()
        self._build_student()
        self._load_online_teacher()
        self._start_distributed()
        self._build_optimizer()
        if self.config.resume and self.checkpoint_path.is_file():
            self.load_checkpoint()
        else:
            self._open_outputs()
        self.trained.train()

    def _open_data(self) -> None:
        """--out checked, every directory verified, the data and eval datasets opened."""
        config = self.config
        self.out = _check_out(config)
        _verify_inputs(config)
        self.device = resolve_device(config.device, self.env.local_rank)
        self.sources = _open_sources(config, self.env.rank, self.env.world_size)
        self.manifest = self.sources[0].manifest
        self.eval_set = None
        if config.eval is not None:
            self.eval_set = SoftLabelDataset(config.eval, batch_size=config.batch_size, shuffle=False, rank=0, world_size=1, verify_sha256=False)
            _check_same_teachers(self.manifest, config.data[0], self.eval_set.manifest, config.eval, "--eval")
        if config.label_column is not None:
            _use_label_column(config, self.sources, self.eval_set)
        if self.env.rank == 0:
            _warn_biased_temperature(config, self.sources, self.eval_set)

    def _build_student(self) -> None:
        """The student, initialised from --seed, probed on one batch: its V must be the teachers'."""
        config = self.config
        torch.manual_seed(config.seed)
        model, self.factory_spec = _load_student(config.student)
        self.model = model.to(self.device)
        self.probe = self.sources[0].first_batch()
        self.next_token = _is_token_sequence(self.probe)
        self.vocab = _output_classes(self.model, self.probe, self.device, config.student)
        if self.vocab != self.manifest["vocab_size"]:
            raise UserError(f"--student {config.student} has {self.vocab} output classes but the teachers of {config.data[0]} have {self.manifest['vocab_size']}")
        if config.alpha == 0.0 and "labels" not in self.probe and not self.next_token:
            raise UserError(f"--alpha 0 trains on hard labels only, but {config.data[0]} has no label column; "
                            "the loss would be 0 at every step (use --alpha > 0, or --label-column)")

    def _load_online_teacher(self) -> None:
        """``--online-teacher``: loaded and probed; its V must be the student's."""
        spec = self.config.online_teacher
        if spec is None:
            return
        self.online_teacher = load_teacher(spec, self.device)
        with torch.no_grad():
            teacher_vocab = student_logits(self.online_teacher.module, self.probe, self.device).shape[-1]
        if teacher_vocab != self.vocab:
            raise UserError(f"--online-teacher {spec} has {teacher_vocab} classes, the student {self.vocab}")

    def _start_distributed(self) -> None:
        """Under torchrun (WORLD_SIZE > 1): the process group (nccl on GPU, gloo on CPU) and DDP."""
        self.trained = self.model
        if self.env.world_size == 1:
            return
        torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.group_started = True
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _build_optimizer(self) -> None:
        """AdamW with linear warmup and cosine decay over ``total_steps`` (--max-steps, else --epochs
        passes over the first directory's share of the smallest rank)."""
        config, world = self.config, self.env.world_size
        batches = min(self.sources[0].num_batches(config.num_workers, rank=r, epoch=0) for r in range(world))
        steps_per_epoch = math.ceil(batches / config.mix_weights[0])
        self.total_steps = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
        warmup = config.warmup_steps if config.warmup_steps is not None else max(1, self.total_steps // 20)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total_steps, warmup))

    def _open_outputs(self) -> None:
        """Batch streams from the loaders' positions; rank 0 makes --out and opens metrics.jsonl at ``step``."""
        if self.env.rank == 0:
            self.out.mkdir()
            _discard_partial_outputs(self.out)
            self.metrics = MetricsLog(self.out / METRICS_NAME, self.step)
        self.streams = [_Stream(source, self.config.num_workers) for source in self.sources]

    # -- one step -----------------------------------------------------------------------------

    def next_batch(self) -> dict[str, Any]:
        """The batch of step ``step``; torch's RNG is re-seeded from (seed, step, rank) first, and
        with several directories the source is drawn from (seed, step) alone."""
        _seed_step(self.config.seed, self.step, self.env.rank)
        return self.streams[_source_of_step(self.config.seed, self.step, self.config.mix_weights)].next()

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch``; ``step`` goes up by one.

        Returns:
            ``loss`` (averaged over ranks), ``kd`` and ``ce`` (this rank), ``positions`` (this
            rank's valid positions).
        """
        config = self.config
        teacher_logits = self._online_teacher_logits(batch)
        with autocast(self.device, config.precision):
            logits = student_logits(self.trained, batch, self.device)
        terms = batch_losses(logits.float(), batch, config, self.next_token, teacher_logits)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss = float(terms["loss"].detach())
        if self.group_started:
            reduced = torch.tensor([loss], device=self.device)
            torch.distributed.all_reduce(reduced)
            loss = float(reduced) / self.env.world_size
        self.positions_seen += int(terms["positions"])
        self.last_loss = loss
        return {"loss": loss, "kd": float(terms["kd"].detach()), "ce": float(terms["ce"].detach()), "positions": int(terms["positions"])}

    def _online_teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """--online-teacher's logits [B, T, V] float32 on ``batch`` (no gradient), or None without one."""
        if self.online_teacher is None:
            return None
        with torch.inference_mode(), autocast(self.device, self.config.precision):
            return student_logits(self.online_teacher.module, batch, self.device).float().clone()

    def log_step(self, terms: dict[str, float]) -> None:
        """Rank 0 writes a metrics.jsonl record every --log-every steps and at the last one."""
        self._window_positions += int(terms["positions"])
        if self.metrics is not None and (self.step % self.config.log_every == 0 or self.step == self.total_steps):
            rate = self._window_positions / max(time.perf_counter() - self._window_start, 1e-9)
            self.metrics.write({"step": self.step, "loss": terms["loss"], "kd": terms["kd"], "ce": terms["ce"],
                                "lr": self.scheduler.get_last_lr()[0], "positions_per_s": rate})
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {terms['loss']:.4f}, {rate:,.0f} pos/s", refresh=False)
            self._window_start, self._window_positions = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)

    # -- evaluation and state -------------------------------------------------------------------

    def evaluate(self, dataset: SoftLabelDataset | None = None) -> dict[str, float]:
        """The student's metrics on ``dataset``, by default the --eval directory (see ``evaluate``)."""
        dataset = self.eval_set if dataset is None else dataset
        if dataset is None:
            raise ValueError("no dataset to evaluate on: this run has no --eval directory")
        return evaluate(self.model, dataset, self.config, self.device, self.next_token)

    def save_checkpoint(self) -> None:
        """Rank 0 writes OUT/checkpoint.pt: weights, optimizer, scheduler, step, loader positions, settings."""
        if self.env.rank != 0:
            return
        _save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "loaders": json.dumps([s.state_dict() for s in self.sources]),
            "settings": json.dumps(self.config.resume_settings()),
        })

    def load_checkpoint(self) -> None:
        """Return to OUT/checkpoint.pt: weights, optimizer, scheduler, step and loader positions;
        metrics.jsonl records past that step are dropped.

        Raises:
            UserError: an unreadable checkpoint, or one made with other settings (naming the flags).
        """
        state = _load_checkpoint(self.checkpoint_path)
        _check_resume(self.config, json.loads(state["settings"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        for source, loader_state in zip(self.sources, json.loads(state["loaders"])):
            source.load_state_dict(loader_state)
        self._open_outputs()

    def save_student(self) -> None:
        """OUT/student.safetensors and OUT/student.json (the SPEC to load it with)."""
        _save_student(self.model, self.out, self.factory_spec, self.manifest)

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> TrainSummary:
        """Steps until the last one, ``--halt-after`` or SIGINT/SIGTERM (each stops at a step boundary
        after a checkpoint; a signal then raises KeyboardInterrupt). After the last step rank 0
        evaluates on --eval and saves the student."""
        self._catch_signals()
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train-student", unit="step", file=sys.stderr,
                        disable=not self.config.progress or self.env.rank != 0, dynamic_ncols=True)
        self._window_start, self._window_positions = time.perf_counter(), 0
        while self.step < self.total_steps:
            self.log_step(self.train_step(self.next_batch()))
            self._after_step()
            if self._halt_requested():
                self.save_checkpoint()
                break
        self._release_signals()
        self.bar.close()
        if self.halt_signal is not None:
            raise KeyboardInterrupt
        if self.step < self.total_steps:
            return self._summary(None, halted=True)
        return self._finish()

    def _after_step(self) -> None:
        """Evaluate every --eval-every steps (rank 0); checkpoint every --checkpoint-every and at the last."""
        config, step = self.config, self.step
        if self.eval_set is not None and config.eval_every and step % config.eval_every == 0 and self.metrics is not None:
            self.metrics.write({"step": step, **self.evaluate()})
        if step % config.checkpoint_every == 0 or step == self.total_steps:
            self.save_checkpoint()

    def _halt_requested(self) -> bool:
        """A signal came, or --halt-after is reached before the last step."""
        halt_after = self.config.halt_after
        return self.halt_signal is not None or (halt_after is not None and halt_after <= self.step < self.total_steps)

    def _finish(self) -> TrainSummary:
        """After the last step: rank 0 evaluates on --eval and saves the student; every rank waits for it."""
        eval_metrics = None
        if self.env.rank == 0:
            if self.eval_set is not None:
                eval_metrics = self.evaluate()
                if self.metrics is not None:  # always, on rank 0
                    self.metrics.write({"step": self.step, **eval_metrics})
            self.save_student()
        if self.group_started:
            torch.distributed.barrier()
        return self._summary(eval_metrics)

    def _summary(self, eval_metrics: dict[str, float] | None, halted: bool = False) -> TrainSummary:
        return TrainSummary(str(self.out), self.step, self.positions_seen, self.last_loss, eval_metrics,
                            time.perf_counter() - self.started, halted=halted)

    # -- teardown -------------------------------------------------------------------------------

    def _catch_signals(self) -> None:
        """Until ``_release_signals``, SIGTERM and SIGINT only set ``halt_signal``."""
        def on_signal(signum: int, _frame: Any) -> None:
            self.halt_signal = signum

        self._previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _release_signals(self) -> None:
        """Put back the handlers ``_catch_signals`` replaced (nothing when none are held)."""
        for sig, handler in (self._previous_handlers or {}).items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)
        self._previous_handlers = None

    def cleanup(self) -> None:
        """Restore the SIGINT/SIGTERM handlers, close the progress bar and destroy the process group
        this recipe started; for every exit path, after a failed ``setup`` too, and idempotent."""
        self._release_signals()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.group_started:
            self.group_started = False
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


@lease_scope
def train_student(config: TrainConfig) -> TrainSummary:
    """Train (or resume) a student from soft-label directories: ``DistillationRecipe`` set up,
    trained, and cleaned up on every exit path.

    Raises:
        UserError: bad settings, unusable data, a student/teacher vocabulary mismatch, or a
            ``--resume`` whose checkpoint was made with other settings.
        KeyboardInterrupt: SIGINT or SIGTERM, after a checkpoint at the step boundary.
    """
    take_lease(config.out, "softlabels train-student")  # one writer per --out, until training ends
    if not config.progress:
        disable_progress_bars()
    recipe = DistillationRecipe(config)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
