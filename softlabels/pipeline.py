"""The unit pipeline: read, compute and commit soft-label units, overlapped, for every engine.

A unit (a row range of one corpus file) is read by a reader thread, computed (teacher forward and
the run's targets) in the calling thread, and committed (shard built, compressed and written whole, then its
entry returned) by a writer thread, so the teacher never waits on storage. Both queues are one unit
deep, so memory is bounded by ``--rows-per-shard`` and ``--batch-size``, never by the corpus. Units
never share a batch, so a unit rerun after a crash sees exactly the batches of an uninterrupted run
and writes the same bytes.

``run_pipeline`` is the one place that overlaps the three stages. The local engine
(``run_units_locally``) runs it in this process and journals each entry; a Ray actor runs the very
same pipeline on its own units, reading from the corpus URI and writing to ``--out`` itself, and
sends back only the entries (``softlabels.ray_engine``). On any exception (Ctrl-C included) a shard
already being written completes whole before the exception propagates.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch

from .codec import LogprobCodec
from .corpus import Corpus, Unit
from .errors import UserError
from .fidelity import Fidelity
from .inputs import TeacherInputs
from .options import GenerateConfig
from .rundir import Journal, RunDirectory, ShardEntry
from .shards import ShardPayload, build_shard, write_shard
from .distributed import autocast
from .teachers import Teacher
from .schema import TARGETS_COLUMN
from .targets import BatchTargets, TargetKind, kind_of
from .targets.topk import usable_positions, valid_positions

__all__ = ["InputKind", "GenerationRun", "forward", "usable_positions", "teacher_logits", "batch_targets", "process_unit", "write_unit", "run_pipeline", "run_units_locally", "ignore_progress"]


class InputKind(Protocol):
    """How a corpus row reaches the teacher: ``inputs.ColumnsKind`` (vectors, tokens, frames),
    ``text.DocumentsKind`` (text and chat, as token windows), ``audio_kind.AudioKind`` (decoded audio).

    The pipeline asks it for the unit's rows as the teacher sees them (reader thread, in the order the
    teacher computes them), the unit's batches as row spans and each row's place in corpus order, each
    batch's TeacherInputs, the teachers' outputs as (logits per teacher, valid positions
    per row), the rows as the shard stores them, and the rows it dropped as bad input; generate asks
    for the probe's rows and checks the teachers' classes. ``counts_documents``: progress counts corpus
    rows (documents), not the rows the teacher sees.
    """

    counts_documents: bool
    default_rows_per_shard: int | None

    def check_column(self, schema: pa.Schema) -> None: ...
    def check_teachers(self, teachers: Sequence[Teacher]) -> None: ...
    def probe_table(self, corpus: Corpus) -> pa.Table: ...
    def check_vocab(self, vocab_size: int) -> None: ...
    def settings(self) -> dict[str, Any]: ...
    def read_unit(self, corpus: Corpus, unit: Unit, table: pa.Table) -> pa.Table: ...
    def spans(self, table: pa.Table) -> tuple[list[tuple[int, int]], np.ndarray]: ...
    def teacher_inputs(self, batch: pa.Table, sample_ids: pa.Array) -> TeacherInputs: ...
    def teacher_outputs(self, teachers: Sequence[Teacher], inputs: TeacherInputs, sample_ids: pa.Array) -> tuple[list[torch.Tensor], torch.Tensor]: ...
    def stored(self, table: pa.Table) -> pa.Table: ...
    def skipped(self, table: pa.Table) -> list[dict[str, str]]: ...


@dataclass
class GenerationRun:
    """A prepared run: its settings, loaded teachers, corpus units and output directory."""

    config: GenerateConfig
    directory: RunDirectory
    corpus: Corpus
    teachers: list[Teacher]
    device: torch.device
    vocab_size: int
    settings: dict[str, Any]
    fingerprint: str
    codec: LogprobCodec = field(default_factory=LogprobCodec)
    header: dict[str, Any] = field(default_factory=dict)
    input_kind: InputKind | None = None  # set by generate._prepare

    def read_unit(self, unit: Unit) -> pa.Table:
        """The unit's rows as the teacher sees them: what the input kind makes of the corpus rows."""
        return self.input_kind.read_unit(self.corpus, unit, self.corpus.read_unit(unit))


def forward(run: GenerationRun, inputs: TeacherInputs, sample_ids: pa.Array) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every teacher's logits for one batch ([B, C] or [B, T, C] each) and the rows' valid positions, in the
    run's precision, as the input kind reads the teachers' outputs."""
    with torch.inference_mode(), autocast(run.device, run.config.precision):
        return run.input_kind.teacher_outputs(run.teachers, inputs, sample_ids)


def target_selection(per_row: torch.Tensor, targets: pa.ChunkedArray | pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a batch's target positions are among its flattened valid positions.

    Args:
        per_row: int64 [B] valid positions of each row.
        targets: the batch's ``target_positions`` (list<int32>, positions within each row).

    Returns:
        (int64 [M] indices into the [N] flattened positions, int64 [B] targets per row).
    """
    if isinstance(targets, pa.ChunkedArray):
        targets = targets.combine_chunks()
    offsets = targets.offsets.to_numpy().astype(np.int64)
    counts = np.diff(offsets)
    within = targets.values.to_numpy(zero_copy_only=False).astype(np.int64)
    first = np.cumsum(per_row.cpu().numpy()) - per_row.cpu().numpy()
    indices = np.repeat(first, counts) + within
    return torch.from_numpy(indices).to(per_row.device), torch.from_numpy(counts).to(per_row.device)


def process_unit(run: GenerationRun, unit: Unit, table: pa.Table, on_batch: Callable[[int, int], None]) -> ShardPayload:
    """Teacher forward and the run's targets (``softlabels.targets``) over one unit's rows, batch by batch.

    With a ``target_positions`` column (chat) only those positions of each row are kept.
    """
    kind = kind_of(run.header)
    by_documents = run.input_kind.counts_documents  # progress counts corpus rows (documents), not windows
    parts: list[Any] = []
    positions_parts, conf_parts, ent_parts, agree_parts = [], [], [], []
    keep = np.ones(table.num_rows, dtype=bool)
    fidelity = Fidelity()
    skipped = run.input_kind.skipped(table)
    if skipped:
        on_batch(len(skipped), 0)  # rows dropped as bad input count as done
    spans, order = run.input_kind.spans(table)  # its batches (audio: by length), stored in corpus order
    for begin, size in spans:
        batch = table.slice(begin, size)
        sample_ids = batch.column("sample_id").combine_chunks()
        member_logits = teacher_logits(run, batch, sample_ids)
        targets, per_row, kept = batch_targets(run, kind, member_logits, batch, sample_ids)
        keep[begin : begin + len(kept)] = kept
        sample_ids = sample_ids.filter(pa.array(kept)) if not kept.all() else sample_ids
        if len(per_row):
            host = targets.to_host(sample_ids.to_pylist(), per_row, fidelity)
            parts.append(host.data)
            conf_parts.append(host.confidence)
            ent_parts.append(host.entropy)
            if host.agreement is not None:
                agree_parts.append(host.agreement)
            positions_parts.append(per_row.cpu().numpy())
        on_batch(0 if by_documents else batch.num_rows, int(per_row.sum()) if len(per_row) else 0)
    if by_documents:
        on_batch(unit.rows, 0)

    def joined(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

    passthrough = table.filter(pa.array(keep)) if not keep.all() else table
    passthrough = run.input_kind.stored(passthrough)
    order = np.argsort(order[keep], kind="stable")
    return ShardPayload(
        passthrough=passthrough,
        positions=joined(positions_parts, (0,), np.int64),
        targets=kind.join(parts, run.header),
        confidence=joined(conf_parts, (0,), np.float32),
        entropy=joined(ent_parts, (0,), np.float32),
        agreement=joined(agree_parts, (0,), np.float32) if len(run.teachers) > 1 else None,
        fidelity=fidelity,
        order=None if order is None or np.array_equal(order, np.arange(len(order))) else order,
        skipped_samples=skipped,
    )


def teacher_logits(run: GenerationRun, batch: pa.Table, sample_ids: pa.Array) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(every teacher's logits, the rows' valid positions or None) for one batch of corpus rows; a model that fails is one line naming the rows."""
    inputs = run.input_kind.teacher_inputs(batch, sample_ids).to(run.device)
    try:
        return forward(run, inputs, sample_ids)
    except UserError:
        raise
    except Exception as exc:  # the user's model failed on these rows: one line naming them, no traceback
        shown = ", ".join(map(str, sample_ids.to_pylist()[:5])) + (f" and {len(sample_ids) - 5} more" if len(sample_ids) > 5 else "")
        detail = " ".join(str(exc).split())[:500]
        raise UserError(f"--teacher: forward failed on the batch of sample ids {shown}: {type(exc).__name__}: {detail}") from None


def batch_targets(run: GenerationRun, kind: TargetKind, member_logits: tuple[list[torch.Tensor], torch.Tensor | None], batch: pa.Table,
                  sample_ids: pa.Array) -> tuple[BatchTargets, torch.Tensor, np.ndarray]:
    """One batch's targets at its valid (chat: target) positions, rows with unusable outputs refused or dropped.

    Returns:
        (the kept rows' targets, int64 [B'] their positions, bool [B] which rows were kept).
    """
    logits, lengths = member_logits
    flat_members, per_row = [], None
    for member in logits:
        flat, per_row = valid_positions(member, lengths)
        flat_members.append(flat)
    if TARGETS_COLUMN in batch.column_names:
        selected, per_row = target_selection(per_row, batch.column(TARGETS_COLUMN))
        flat_members = [flat[selected] for flat in flat_members]
    row_of = torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)
    targets = kind.compute(flat_members, per_row, run)
    finite = targets.usable
    bad_rows = torch.zeros(len(per_row), dtype=torch.bool, device=finite.device).index_put_((row_of,), ~finite, accumulate=True)
    kept = np.ones(len(per_row), dtype=bool)
    if bool(bad_rows.any()):
        bad_ids = sample_ids.filter(pa.array(bad_rows.cpu().numpy())).to_pylist()
        if run.config.on_nonfinite == "error":
            shown = ", ".join(bad_ids[:10]) + (f" and {len(bad_ids) - 10} more" if len(bad_ids) > 10 else "")
            raise UserError(f"teacher output is NaN/Inf for sample ids {shown}; use --on-nonfinite skip to drop them")
        kept = ~bad_rows.cpu().numpy()
        targets = targets.of_rows(~bad_rows, per_row)
        per_row = per_row[~bad_rows]
    return targets, per_row, kept


def write_unit(run: GenerationRun, unit: Unit, payload: ShardPayload, skipped: int) -> ShardEntry:
    """Build unit N's shard and write it whole into the run directory; returns its journal entry."""
    positions = int(payload.positions.sum())
    header = {**run.header, "unit": unit.index, "rows": payload.passthrough.num_rows, "positions": positions}
    table = build_shard(payload, run.vocab_size, len(run.teachers), header)
    size, digest, soft_bytes = write_shard(table, run.directory, unit.index, positions)
    return {
        "file": run.directory.unit_shard_path(unit.index).name,
        "unit": unit.index,
        "rows": table.num_rows,
        "positions": positions,
        "bytes": size,
        "soft_label_bytes": soft_bytes,
        "sha256": digest,
        "fidelity": payload.fidelity.to_json(),
        "skipped_nonfinite": skipped,
        **({"skipped_samples": payload.skipped_samples} if payload.skipped_samples else {}),
    }


def ignore_progress(rows: int, positions: int) -> None:
    """A progress callback for pipelines whose progress is reported per unit elsewhere."""


def run_pipeline(
    units: Iterable[Unit],
    read: Callable[[Unit], pa.Table],
    compute: Callable[[Unit, pa.Table], ShardPayload],
    commit: Callable[[Unit, ShardPayload, int], ShardEntry],
) -> Iterator[ShardEntry]:
    """Read, compute and commit ``units`` with the stages overlapped; yields each committed entry in order.

    ``commit`` gets the unit, its payload and the rows dropped for non-finite outputs. On any
    exception (Ctrl-C, a closed generator) the shard being written completes whole first.
    """
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-write")
    reads: deque[tuple[Unit, Future[pa.Table]]] = deque()
    writes: deque[Future[ShardEntry]] = deque()
    queue = iter(units)
    try:
        for unit in queue:
            reads.append((unit, reader.submit(read, unit)))
            if len(reads) >= 2:
                break
        while reads:
            unit, table_future = reads.popleft()
            next_unit = next(queue, None)
            if next_unit is not None:
                reads.append((next_unit, reader.submit(read, next_unit)))
            table = table_future.result()
            payload = compute(unit, table)
            while writes:  # one shard being written at a time
                yield writes.popleft().result()
            writes.append(writer.submit(commit, unit, payload, table.num_rows - payload.passthrough.num_rows))
        while writes:
            yield writes.popleft().result()
    except BaseException:
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)  # a shard already being written completes whole
        raise
    reader.shutdown()
    writer.shutdown()


def run_units_locally(run: GenerationRun, journal: Journal, pending: list[Unit], on_batch: Callable[[int, int], None],
                      entries: dict[int, ShardEntry]) -> None:
    """The local engine: the pipeline in this process, each unit journalled once its shard is whole."""

    def commit(unit: Unit, payload: ShardPayload, skipped: int) -> ShardEntry:
        entry = write_unit(run, unit, payload, skipped)
        journal.append(entry)  # in the writer thread, right after the shard: Ctrl-C keeps both or neither
        return entry

    for entry in run_pipeline(pending, run.read_unit, lambda unit, table: process_unit(run, unit, table, on_batch), commit):
        entries[entry["unit"]] = entry
