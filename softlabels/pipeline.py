"""The unit pipeline: read, compute and commit soft-label units, overlapped, for every engine.

A unit (a row range of one corpus file) is read by a reader thread, computed (teacher forward and
top-k) in the calling thread, and committed (shard built, compressed and written whole, then its
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
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from .codec import LogprobCodec
from .corpus import Corpus, Unit
from .errors import UserError
from .fidelity import Fidelity
from .inputs import TeacherInputs, to_teacher_inputs
from .options import GenerateConfig
from .rundir import Journal, RunDirectory, ShardEntry
from .shards import ShardPayload, build_shard, write_shard
from .distributed import autocast
from .teachers import Teacher
from .schema import TARGETS_COLUMN
from .text import DocumentWindows
from .sampling import SampledTargets, position_keys, sampled_labels
from .topk import soft_labels, valid_positions

__all__ = ["GenerationRun", "forward", "process_unit", "write_unit", "run_pipeline", "run_units_locally", "ignore_progress"]


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
    documents: DocumentWindows | None = None

    def read_unit(self, unit: Unit) -> pa.Table:
        """The unit's rows as the teacher sees them: corpus rows, or the token windows of its documents."""
        table = self.corpus.read_unit(unit)
        return table if self.documents is None else self.documents(table)


def forward(run: GenerationRun, inputs: TeacherInputs) -> list[torch.Tensor]:
    """Every teacher's logits for one batch ([B, C] or [B, T, C] each), in the run's precision."""
    with torch.inference_mode(), autocast(run.device, run.config.precision):
        return [teacher.logits(inputs) for teacher in run.teachers]


def usable_positions(logits: torch.Tensor) -> torch.Tensor:
    """[N] True where a position's logits define a distribution: no NaN or +Inf, and not all -Inf.

    -Inf alone is a legitimate logit (a masked class, a padded vocabulary entry).
    """
    finite_sums = logits.sum(dim=-1).isfinite()  # one pass, no [N, V] temporary
    if bool(finite_sums.all()):
        return finite_sums
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    return ~bad


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
    """Teacher forward and top-k (or sampled targets) over one unit's rows, batch by batch.

    With a ``target_positions`` column (chat) only those positions of each row are kept. Sampled
    targets are drawn with keys from (run fingerprint, sample id, index of the position among the
    row's stored positions), so they do not depend on the batch a row falls in.
    """
    config = run.config
    sampling = config.targets == "sample"
    by_documents = run.documents is not None  # progress counts corpus rows (documents), not windows
    ids_parts, logprob_parts, positions_parts, conf_parts, ent_parts, agree_parts = [], [], [], [], [], []
    sampled_parts: list[SampledTargets] = []
    keep = np.ones(table.num_rows, dtype=bool)
    fidelity = Fidelity()
    for begin in range(0, table.num_rows, config.batch_size):
        batch = table.slice(begin, config.batch_size)
        sample_ids = batch.column("sample_id").combine_chunks()
        inputs = to_teacher_inputs(batch.column(config.input_column), config.input_column, sample_ids).to(run.device)
        try:
            member_logits = forward(run, inputs)
        except UserError:
            raise
        except Exception as exc:  # the user's model failed on these rows: one line naming them, no traceback
            shown = ", ".join(map(str, sample_ids.to_pylist()[:5])) + (f" and {len(sample_ids) - 5} more" if len(sample_ids) > 5 else "")
            detail = " ".join(str(exc).split())[:500]
            raise UserError(f"--teacher: forward failed on the batch of sample ids {shown}: {type(exc).__name__}: {detail}") from None
        flat_members, per_row = [], None
        for logits in member_logits:
            flat, per_row = valid_positions(logits, inputs.lengths)
            flat_members.append(flat)
        if TARGETS_COLUMN in batch.column_names:
            selected, per_row = target_selection(per_row, batch.column(TARGETS_COLUMN))
            flat_members = [flat[selected] for flat in flat_members]
        row_of = torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)
        labels = None if sampling else soft_labels(flat_members, per_row, config.top_k, config.ensemble, run.codec)
        finite = labels.usable if labels is not None else torch.stack([usable_positions(flat) for flat in flat_members]).all(dim=0)
        bad_rows = torch.zeros(len(per_row), dtype=torch.bool, device=finite.device).index_put_((row_of,), ~finite, accumulate=True)
        if bool(bad_rows.any()):
            bad_ids = sample_ids.filter(pa.array(bad_rows.cpu().numpy())).to_pylist()
            if config.on_nonfinite == "error":
                shown = ", ".join(bad_ids[:10]) + (f" and {len(bad_ids) - 10} more" if len(bad_ids) > 10 else "")
                raise UserError(
                    f"teacher output is NaN/Inf for sample ids {shown}; use --on-nonfinite skip to drop them"
                )
            keep[begin : begin + len(per_row)] = ~bad_rows.cpu().numpy()
            if labels is None:
                flat_members = [flat[~bad_rows[row_of]] for flat in flat_members]
            else:
                labels = labels.of_rows(~bad_rows, per_row)
            per_row = per_row[~bad_rows]
            sample_ids = sample_ids.filter(pa.array(~bad_rows.cpu().numpy()))
        if len(per_row) and sampling:
            keys = position_keys(run.fingerprint, sample_ids.to_pylist(), per_row)
            drawn = sampled_labels(flat_members, per_row, keys, config.samples, config.proposal_temperature, config.ensemble)
            targets = drawn.targets
            sampled_parts.append(SampledTargets(targets.ids.cpu(), targets.counts.cpu(), targets.logprobs.cpu(), targets.offsets.cpu(),
                                                targets.log_normalizer.cpu(), targets.samples, targets.proposal_temperature))
            conf_parts.append(drawn.confidence.cpu().numpy())
            ent_parts.append(drawn.entropy.cpu().numpy())
            if drawn.agreement is not None:
                agree_parts.append(drawn.agreement.cpu().numpy())
            positions_parts.append(per_row.cpu().numpy())
            fidelity.add_sampled(drawn.drawn_mass.cpu().numpy(), targets.unique_per_position().cpu().numpy())
        elif len(per_row):
            ids_parts.append(labels.ids.cpu().numpy())
            logprob_parts.append(labels.logprobs.cpu().numpy())
            conf_parts.append(labels.confidence.cpu().numpy())
            ent_parts.append(labels.entropy.cpu().numpy())
            if labels.agreement is not None:
                agree_parts.append(labels.agreement.cpu().numpy())
            positions_parts.append(per_row.cpu().numpy())
            fidelity.add(labels.captured_mass.cpu().numpy(), labels.stored_kl.cpu().numpy())
        on_batch(0 if by_documents else batch.num_rows, int(per_row.sum()) if len(per_row) else 0)
    if by_documents:
        on_batch(unit.rows, 0)

    def joined(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

    k = config.top_k
    sampled = None
    if sampling:
        sampled = SampledTargets.concat(sampled_parts) if sampled_parts else SampledTargets(
            torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0), torch.zeros(1, dtype=torch.int64),
            torch.empty(0), config.samples, config.proposal_temperature)
    return ShardPayload(
        passthrough=table.filter(pa.array(keep)) if not keep.all() else table,
        positions=joined(positions_parts, (0,), np.int64),
        ids=None if sampling else joined(ids_parts, (0, k), np.int64),
        logprobs=None if sampling else joined(logprob_parts, (0, k), np.float32),
        confidence=joined(conf_parts, (0,), np.float32),
        entropy=joined(ent_parts, (0,), np.float32),
        agreement=joined(agree_parts, (0,), np.float32) if len(run.teachers) > 1 else None,
        fidelity=fidelity,
        sampled=sampled,
    )


def write_unit(run: GenerationRun, unit: Unit, payload: ShardPayload, skipped: int) -> ShardEntry:
    """Build unit N's shard and write it whole into the run directory; returns its journal entry."""
    positions = int(payload.positions.sum())
    header = {**run.header, "unit": unit.index, "rows": payload.passthrough.num_rows, "positions": positions}
    table = build_shard(payload, run.vocab_size, run.config.top_k, len(run.teachers), header)
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
