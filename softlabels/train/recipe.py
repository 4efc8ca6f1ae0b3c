"""``softlabels train-student``: distil a student from stored soft labels, resumably.

Thin orchestration over tested parts: ``SoftLabelDataset`` streams batches (``sources``), the
objective ``alpha * KD + (1 - alpha) * CE`` (``objective``), AdamW with linear warmup and cosine
decay, gradient clipping, optional bf16 autocast, DDP under torchrun (gloo on CPU, nccl on GPU),
checkpoints and student files (``checkpoint``). ``DistillationRecipe`` holds the pieces (setup, one
step, evaluation, checkpoints, cleanup); ``train_student`` drives them.

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
import json
import math
import signal
import sys
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..data import SoftLabelDataset
from ..distributed import autocast, distributed_env, resolve_device
from ..errors import UserError
from ..hf import disable_progress_bars
from ..lease import lease_scope
from ..options import TrainConfig
from ..storage import Location
from ..teachers import Teacher, load_teacher
from .checkpoint import (CHECKPOINT_NAME, METRICS_NAME, check_out, check_resume, discard_partial_outputs, read_checkpoint,
                         write_checkpoint, write_student)
from .evaluation import evaluate
from .metrics import MetricsLog, TrainSummary
from .objective import batch_losses, is_token_sequence, student_logits
from .sources import (BatchStream, open_eval, open_sources, source_of_step, use_label_column, verify_inputs,
                      warn_biased_temperature)
from .student import load_student, output_classes

__all__ = ["DistillationRecipe", "HaltSignals", "train_student"]


def schedule(total_steps: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup over ``warmup`` steps, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def seed_step(seed: int, step: int, rank: int) -> None:
    """Re-seed torch's RNG from (seed, step, rank): a resumed run draws what a straight one draws."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class HaltSignals:
    """While held (``catch`` to ``release``), SIGTERM and SIGINT only set ``received``, so a run
    stops at a step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] | None = None

    def catch(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            self.received = signum

        self.previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def release(self) -> None:
        """Put back the handlers ``catch`` replaced (nothing when none are held)."""
        for sig, handler in (self.previous or {}).items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, handler)
        self.previous = None


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
    precision: Any  # distributed.autocast(device, --precision): entered around every student forward
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
    streams: list[BatchStream]

    def __init__(self, config: TrainConfig, claimed: Location | None = None) -> None:
        """``claimed``: ``--out`` as ``train_student`` claimed it (checked, leased); None checks it in ``setup``."""
        self.config = config
        self.claimed = claimed
        self.env = distributed_env()
        self.started = time.perf_counter()
        self.step = 0
        self.positions_seen = 0
        self.last_loss = float("nan")
        self.metrics: MetricsLog | None = None
        self.online_teacher: Teacher | None = None
        self.group_started = False
        self.signals = HaltSignals()
        self.bar: tqdm | None = None
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
        self.out = self.claimed if self.claimed is not None else check_out(config)  # checked once
        verify_inputs(config)
        self.device = resolve_device(config.device, self.env.local_rank)
        self.precision = autocast(self.device, config.precision)  # the student's compute context, entered once per forward
        self.sources = open_sources(config, self.env.rank, self.env.world_size)
        self.manifest = self.sources[0].manifest
        self.eval_set = open_eval(config, self.manifest)
        if config.label_column is not None:
            use_label_column(config, self.sources, self.eval_set)
        if self.env.rank == 0:
            warn_biased_temperature(config, self.sources, self.eval_set)

    def _build_student(self) -> None:
        """The student, initialised from --seed, probed on one batch: its V must be the teachers'."""
        config = self.config
        torch.manual_seed(config.seed)
        model, self.factory_spec = load_student(config.student)
        self.model = model.to(self.device)
        self.probe = self.sources[0].first_batch()
        self.next_token = is_token_sequence(self.probe)
        self.vocab = output_classes(self.model, self.probe, self.device, config.student)
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(self.total_steps, warmup))

    def _open_outputs(self) -> None:
        """Batch streams from the loaders' positions; rank 0 makes --out and opens metrics.jsonl at ``step``."""
        if self.env.rank == 0:
            self.out.mkdir()
            discard_partial_outputs(self.out)
            self.metrics = MetricsLog(self.out / METRICS_NAME, self.step)
        self.streams = [BatchStream(source, self.config.num_workers) for source in self.sources]

    # -- one step -----------------------------------------------------------------------------

    def next_batch(self) -> dict[str, Any]:
        """The batch of step ``step``; torch's RNG is re-seeded from (seed, step, rank) first, and
        with several directories the source is drawn from (seed, step) alone."""
        seed_step(self.config.seed, self.step, self.env.rank)
        return self.streams[source_of_step(self.config.seed, self.step, self.config.mix_weights)].next()

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch``; ``step`` goes up by one.

        Returns:
            ``loss`` (averaged over ranks), ``kd`` and ``ce`` (this rank), ``positions`` (this
            rank's valid positions).
        """
        config = self.config
        teacher_logits = self._online_teacher_logits(batch)
        with self.precision:
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
        with torch.inference_mode(), self.precision:
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
        return evaluate(self.model, dataset, self.config, self.device, self.next_token, self.precision)

    def save_checkpoint(self) -> None:
        """Rank 0 writes OUT/checkpoint.pt: weights, optimizer, scheduler, step, loader positions, settings."""
        if self.env.rank != 0:
            return
        write_checkpoint(self.checkpoint_path, {
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
        state = read_checkpoint(self.checkpoint_path)
        check_resume(self.config, json.loads(state["settings"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        for source, loader_state in zip(self.sources, json.loads(state["loaders"])):
            source.load_state_dict(loader_state)
        self._open_outputs()

    def save_student(self) -> None:
        """OUT/student.safetensors and OUT/student.json (the SPEC to load it with)."""
        write_student(self.model, self.out, self.factory_spec, self.manifest)

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> TrainSummary:
        """Steps until the last one, ``--halt-after`` or SIGINT/SIGTERM (each stops at a step boundary
        after a checkpoint; a signal then raises KeyboardInterrupt). After the last step rank 0
        evaluates on --eval and saves the student."""
        self.signals.catch()
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train-student", unit="step", file=sys.stderr,
                        disable=not self.config.progress or self.env.rank != 0, dynamic_ncols=True)
        self._window_start, self._window_positions = time.perf_counter(), 0
        while self.step < self.total_steps:
            self.log_step(self.train_step(self.next_batch()))
            self._after_step()
            if self._halt_requested():
                self.save_checkpoint()
                break
        self.signals.release()
        self.bar.close()
        if self.signals.received is not None:
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
        return self.signals.received is not None or (halt_after is not None and halt_after <= self.step < self.total_steps)

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

    def cleanup(self) -> None:
        """Restore the SIGINT/SIGTERM handlers, close the progress bar and destroy the process group
        this recipe started; for every exit path, after a failed ``setup`` too, and idempotent."""
        self.signals.release()
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
    claimed = check_out(config, lease=True)  # one writer per --out, until training ends
    if not config.progress:
        disable_progress_bars()
    recipe = DistillationRecipe(config, claimed)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
