"""``softlabels train-student``: distil a student from stored soft labels, resumably.

Thin orchestration over tested parts: ``SoftLabelDataset`` streams batches, ``kd_loss`` and
``hard_label_loss`` make the objective ``alpha * KD + (1 - alpha) * CE``, AdamW with linear warmup and
cosine decay, gradient clipping, optional bf16 autocast, DDP under torchrun (gloo on CPU, nccl on
GPU).

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
from .distributed import distributed_env
from .errors import UserError, VerificationError
from .inputs import TeacherInputs
from .losses import IGNORE_INDEX, dense_kd_per_position, hard_label_loss, kd_loss_per_position
from .options import TrainConfig, flag_of
from .storage import Location, atomic_write_text
from .teachers import autocast, load_model, resolve_device

__all__ = ["TrainConfig", "TrainSummary", "train_student", "evaluate", "student_logits", "batch_losses"]

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
    steps = batch["topk_ids"].shape[1]
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


def batch_losses(logits: torch.Tensor, batch: dict[str, Any], config: TrainConfig, next_token: bool,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: ``loss`` (to minimise), ``kd``, ``ce`` and counts.

    Only valid positions are gathered before the losses, so padding costs no [., V] work: with
    ragged sequences of 32-128 tokens that is about a third of the vocabulary-sized arithmetic.
    With ``teacher_logits`` [B, T, V] (online distillation) KD uses the full teacher distribution
    instead of the stored top-k.
    """
    device = logits.device
    mask = batch["mask"].to(device)
    valid_logits = logits[mask]
    if teacher_logits is not None:
        per_position = dense_kd_per_position(valid_logits, teacher_logits[mask], config.temperature)
    else:
        per_position = kd_loss_per_position(valid_logits, batch["topk_ids"].to(device)[mask], batch["topk_logprobs"].to(device)[mask], config.temperature, config.tail)
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
    if out.is_file():
        raise UserError(f"--out {out} exists and is not a directory")
    for name in out.listdir():
        if name not in OUTPUT_NAMES and not (name.endswith(".tmp") and name.split(".tmp")[0].startswith(OUTPUT_NAMES)):
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
        except VerificationError as exc:
            message = str(exc)
            if "not complete" in message or "no manifest" in message:
                raise UserError(f"{flag} {directory}: {message}") from None
            raise VerificationError(f"{flag} {directory}: {message}") from None
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


def _build_student(spec: str) -> tuple[torch.nn.Module, str]:
    model, _ = load_model(spec, "--student")
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise UserError(f"--student {spec}: a student must be a trainable module (module:factory or hf:CONFIG)")
    return model, spec.partition("@")[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: SoftLabelDataset, config: TrainConfig, device: torch.device, next_token: bool) -> dict[str, float]:
    """KD loss, top-1 agreement with the teacher, and accuracy / CE against hard labels when present."""
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
        per_position = kd_loss_per_position(logits, batch["topk_ids"].to(device), batch["topk_logprobs"].to(device), config.temperature, config.tail)
        kd_sum += float((per_position * mask).sum())
        prediction = logits.argmax(dim=-1)
        agree += float(((prediction == batch["topk_ids"][..., 0].to(device)) & mask).sum())
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
    object is written again with each record."""

    def __init__(self, location: Location, step: int) -> None:
        self.location = location
        self.lines: list[str] = []
        if location.is_file():  # a resumed run: drop records past the checkpoint, so it reads as one run
            self.lines = [line for line in location.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
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
            with open(self.location.local_path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        else:
            self._write_all()


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


def _save_student(model: torch.nn.Module, out: Location, spec: str, manifest: dict[str, Any]) -> None:
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="softlabels-student-") as scratch:
        staged = os.path.join(scratch, "student.safetensors")
        save_model(model, staged, metadata={"spec": spec})  # stores tied weights (LM heads) once
        (out / "student.safetensors").write_bytes(Path(staged).read_bytes())
    record = {"spec": f"{spec}@{(out / 'student.safetensors').uri}", "factory": spec,
              "teachers": manifest["teachers"], "vocab_size": manifest["vocab_size"]}
    (out / "student.json").write_bytes((json.dumps(record, indent=2) + "\n").encode())


def train_student(config: TrainConfig) -> TrainSummary:
    """Train (or resume) a student from soft-label directories.

    Raises:
        UserError: bad settings, unusable data, a student/teacher vocabulary mismatch, or a
            ``--resume`` whose checkpoint was made with other settings.
    """
    started = time.perf_counter()
    env = distributed_env()
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    out = _check_out(config)
    _verify_inputs(config)
    device = resolve_device(config.device, local_rank)
    sources = _open_sources(config, rank, world)
    manifest = sources[0].manifest
    eval_set = None
    if config.eval is not None:
        eval_set = SoftLabelDataset(config.eval, batch_size=config.batch_size, shuffle=False, rank=0, world_size=1, verify_sha256=False)
        _check_same_teachers(manifest, config.data[0], eval_set.manifest, config.eval, "--eval")
    if config.label_column is not None:
        for source, directory in [(s, d) for s, d in zip(sources, config.data)] + ([(eval_set, config.eval)] if eval_set else []):
            if config.label_column not in source.columns():
                raise UserError(f"--label-column {config.label_column}: no such column in {directory} (columns: {', '.join(source.columns())})")
            source.label_column = config.label_column

    torch.manual_seed(config.seed)
    model, factory_spec = _build_student(config.student)
    model = model.to(device)
    probe = sources[0].first_batch()
    # token sequences without a label column: the hard label of position j is token j + 1
    next_token = "labels" not in probe and probe["inputs"].dim() == 2 and not torch.is_floating_point(probe["inputs"]) and probe["topk_ids"].shape[1] > 1
    try:
        with torch.no_grad():
            vocab = student_logits(model, probe, device).shape[-1]
    except UserError:
        raise
    except Exception as exc:  # the user's student rejected the calling convention of the data
        shape = f"inputs {tuple(probe['inputs'].shape)}" + (", lengths [B]" if "lengths" in probe else "")
        raise UserError(f"--student {config.student}: forward failed on {shape}: {type(exc).__name__}: {exc}") from None
    if vocab != manifest["vocab_size"]:
        raise UserError(f"--student {config.student} has {vocab} output classes but the teachers of {config.data[0]} have {manifest['vocab_size']}")
    if config.alpha == 0.0 and "labels" not in probe and not next_token:
        raise UserError(f"--alpha 0 trains on hard labels only, but {config.data[0]} has no label column; "
                        "the loss would be 0 at every step (use --alpha > 0, or --label-column)")

    online_teacher = None
    if config.online_teacher is not None:
        from .teachers import load_teacher

        online_teacher = load_teacher(config.online_teacher, device)
        with torch.no_grad():
            teacher_vocab = student_logits(online_teacher.module, probe, device).shape[-1]
        if teacher_vocab != vocab:
            raise UserError(f"--online-teacher {config.online_teacher} has {teacher_vocab} classes, the student {vocab}")

    distributed = world > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model

    steps_per_epoch = math.ceil(min(sources[0].num_batches(config.num_workers, rank=r, epoch=0) for r in range(world)) / config.mix_weights[0])
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total_steps // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, warmup))

    checkpoint_path = out / CHECKPOINT_NAME
    step = 0
    if checkpoint_path.is_file() and not config.resume:
        raise UserError(f"--out {out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if config.resume and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path)
        _check_resume(config, json.loads(state["settings"]))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        for source, loader_state in zip(sources, json.loads(state["loaders"])):
            source.load_state_dict(loader_state)
    if rank == 0:
        out.mkdir()
    metrics = MetricsLog(out / METRICS_NAME, step) if rank == 0 else None
    streams = [_Stream(source, config.num_workers) for source in sources]

    def checkpoint() -> None:
        if rank != 0:
            return
        _save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "loaders": json.dumps([s.state_dict() for s in sources]),
            "settings": json.dumps(config.resume_settings()),
        })

    halted = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        halted["signal"] = signum

    # a signal stops the run at the next step boundary, after a checkpoint
    previous_term = signal.signal(signal.SIGTERM, on_signal)
    previous_int = signal.signal(signal.SIGINT, on_signal)
    bar = tqdm(total=total_steps, initial=step, desc="train-student", unit="step", file=sys.stderr, disable=not config.progress or rank != 0, dynamic_ncols=True)
    positions_seen, window_start, window_positions = 0, time.perf_counter(), 0
    last_loss = float("nan")
    trained.train()
    try:
        while step < total_steps:
            _seed_step(config.seed, step, rank)
            batch = streams[_source_of_step(config.seed, step, config.mix_weights)].next()
            teacher_logits = None
            if online_teacher is not None:
                with torch.inference_mode(), autocast(device, config.precision):
                    teacher_logits = student_logits(online_teacher.module, batch, device).float().clone()
            with autocast(device, config.precision):
                logits = student_logits(trained, batch, device)
            terms = batch_losses(logits.float(), batch, config, next_token, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            positions = int(terms["positions"])
            positions_seen += positions
            window_positions += positions
            last_loss = float(terms["loss"].detach())
            if distributed:
                reduced = torch.tensor([last_loss], device=device)
                torch.distributed.all_reduce(reduced)
                last_loss = float(reduced) / world
            if rank == 0 and (step % config.log_every == 0 or step == total_steps):
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                metrics.write({"step": step, "loss": last_loss, "kd": float(terms["kd"].detach()), "ce": float(terms["ce"].detach()),
                               "lr": scheduler.get_last_lr()[0], "positions_per_s": window_positions / elapsed})
                bar.set_postfix_str(f"loss {last_loss:.4f}, {window_positions / elapsed:,.0f} pos/s", refresh=False)
                window_start, window_positions = time.perf_counter(), 0
            bar.update(1)
            if eval_set is not None and config.eval_every and step % config.eval_every == 0 and rank == 0:
                metrics.write({"step": step, **evaluate(model, eval_set, config, device, next_token)})
            if step % config.checkpoint_every == 0 or step == total_steps:
                checkpoint()
            if halted["signal"] is not None or (config.halt_after is not None and step >= config.halt_after and step < total_steps):
                checkpoint()
                break
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        bar.close()
    if halted["signal"] is not None:
        raise KeyboardInterrupt
    if step < total_steps:
        if distributed:
            torch.distributed.destroy_process_group()
        return TrainSummary(str(out), step, positions_seen, last_loss, None, time.perf_counter() - started, halted=True)
    eval_metrics = None
    if rank == 0:
        if eval_set is not None:
            eval_metrics = evaluate(model, eval_set, config, device, next_token)
            metrics.write({"step": step, **eval_metrics})
        _save_student(model, out, factory_spec, manifest)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainSummary(str(out), step, positions_seen, last_loss, eval_metrics, time.perf_counter() - started)
