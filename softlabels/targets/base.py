"""The target-kind interface and its registry.

A target kind is what a run stores per position (``topk``: the k most probable classes; ``sample``:
N draws from the teacher; a third kind is one module and a ``register`` call). The kind owns its
header and schema fields, the computation from a batch of logits to shard arrays and fidelity, the
decode from Arrow back to batch tensors, the per-position loss and its lines in ``inspect``. The
header's ``targets`` names the kind (``topk`` when absent: shards of earlier releases).

Nothing above ``softlabels.targets`` branches on the kind: it asks the registry (``kind_named``,
``kind_of`` a header or manifest, ``kind_of_columns`` of shard rows, ``kind_of_batch``) and calls
the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import pyarrow as pa
import torch

from ..codec import LogprobCodec
from ..errors import UserError
from ..fidelity import Fidelity
from ..options import TARGET_KINDS

__all__ = ["TargetKind", "BatchTargets", "HostTargets", "RowTargets", "register", "unregister", "registered", "kind_named", "kind_of",
           "kind_of_columns", "kind_of_batch", "all_soft_columns", "all_logprob_columns", "all_batch_keys", "soft_columns", "distribution", "HISTOGRAM_BINS"]

DEFAULT_KIND = "topk"
"""The kind of a header or manifest that does not say (every release before sampled targets)."""


@dataclass
class HostTargets:
    """One batch's targets on the host, ready for a shard: the kind's own data (``data``, joined per unit
    by ``TargetKind.join``) and the kept rows' statistics (float32 [B] each; agreement None for one teacher)."""

    data: Any
    confidence: np.ndarray
    entropy: np.ndarray
    agreement: np.ndarray | None


@runtime_checkable
class BatchTargets(Protocol):
    """A batch's targets as computed from the teachers' logits, before the rows with unusable outputs go."""

    usable: torch.Tensor
    """bool [N]: True where every teacher's logits define a distribution."""

    def of_rows(self, keep: torch.Tensor, positions_per_row: torch.Tensor) -> "BatchTargets":
        """The targets of the rows where ``keep`` (bool [B]) is True."""

    def to_host(self, sample_ids: Sequence[str], positions_per_row: torch.Tensor, fidelity: Fidelity) -> HostTargets:
        """The kept rows' targets on the host; records their fidelity figures into ``fidelity``."""


class RowTargets(Protocol):
    """Decoded targets of a table of shard rows; ``batch(rows)`` gives the kind's batch tensors and ``mask``."""

    def batch(self, rows: np.ndarray) -> dict[str, Any]: ...


class TargetKind(Protocol):
    """One kind of stored targets. See the module docstring."""

    name: str
    """The header's ``targets`` value."""
    manifest_keys: tuple[str, ...]
    """Header keys a sealed manifest of this kind must hold, each a positive count or a number."""
    size_key: str | None
    """The manifest key that counts what a position stores (must be a positive count), or None."""
    batch_keys: tuple[str, ...]
    """Every key the kind's decoder puts in a batch besides ``mask``."""
    batch_key: str
    """A key that only this kind's batches hold (how a mixed training stream tells batches apart)."""
    id_column: str
    """A column that only this kind's shard rows hold (how rows without their header are told apart)."""
    soft_column_names: tuple[str, ...]
    """Every soft-label column name this kind may write (encoding and byte accounting)."""
    inspect_figures: tuple[str, ...]
    """The report's distributions that ``inspect`` adds (shown in this order, before confidence and entropy)."""
    logprob_column_names: tuple[str, ...]
    """Those of them that hold log-probabilities or their codes (compressed harder)."""

    def prepare(self, config: Any, vocab_size: int) -> None:
        """Check and complete the generate config's kind flags once the vocabulary is known (UserError)."""

    def settings(self, config: Any) -> dict[str, Any]:
        """The kind's fingerprinted settings."""

    def header(self, config: Any) -> dict[str, Any]:
        """The kind's shard-header fields (``targets`` included)."""

    def fields(self, vocab_size: int, header: dict[str, Any], codec: LogprobCodec) -> list[pa.Field]:
        """The soft-label fields of a shard, after the passed-through columns, before the statistics."""

    def columns(self, header: dict[str, Any], codec: LogprobCodec) -> tuple[str, str | None]:
        """The (ids, stored log-probabilities or None) column names of a run of this kind; the ids column's
        lists have one entry per stored position."""

    def compute(self, member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, run: Any) -> BatchTargets:
        """Targets of N valid positions from each teacher's [N, C] logits (``run``: the GenerationRun)."""

    def join(self, parts: list[Any], header: dict[str, Any]) -> Any:
        """One unit's ``HostTargets.data`` parts joined (none: an empty unit)."""

    def arrays(self, data: Any, positions: np.ndarray, vocab_size: int, codec: LogprobCodec, header: dict[str, Any]) -> list[pa.Array]:
        """Arrow arrays matching ``fields`` for the joined data of rows with ``positions`` each."""

    def fidelity_summary(self, fidelity: Fidelity) -> dict[str, float]:
        """The manifest's ``fidelity`` of a run of this kind."""

    def describe_fidelity(self, soft_per_position: float, fidelity: dict[str, float]) -> str:
        """generate's closing figures: what the soft-label bytes hold and how faithful they are."""

    def read_columns(self, header: dict[str, Any], codec: LogprobCodec) -> list[str]:
        """The soft-label columns the loader reads."""

    def codec_without_header(self, schema: pa.Schema) -> LogprobCodec:
        """How rows that lost their header store log-probabilities (UserError when they cannot say)."""

    def row_options(self, schema: pa.Schema, header: dict[str, Any] | None) -> dict[str, Any]:
        """What decoding needs besides the codec, from the header, else the fields' metadata."""

    def rows(self, table: pa.Table, codec: LogprobCodec, options: dict[str, Any],
             place: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, int] | None]) -> RowTargets:
        """Decoder of ``table``'s targets. ``place(rows)`` gives, for rows whose targets sit at some
        positions only (chat), (plan source indices, row of each, step of each, T), else None."""

    def loss_per_position(self, logits: torch.Tensor, pick: Callable[[str], torch.Tensor], batch: dict[str, Any],
                          temperature: float, tail: str) -> torch.Tensor:
        """KL(teacher_T || student_T) per position, without T^2; ``pick(key)`` selects a batch tensor's positions."""

    def teacher_top1(self, batch: dict[str, Any]) -> torch.Tensor:
        """int64 [B, T] the teacher's most probable stored class per position."""

    def bias_warning(self, temperature: float, header: dict[str, Any]) -> str | None:
        """Why the loss at this distillation temperature estimates the dense KD loss with a bias (None: it does not),
        as the rest of a sentence starting with the temperature flag."""

    def inspect(self, scan: Any, manifest: dict[str, Any], codec: LogprobCodec) -> tuple[dict[str, Any], Any]:
        """(report figures, a polars frame with a ``top1`` column per position) of a sealed run's shards."""

    def inspect_lines(self, report: dict[str, Any]) -> tuple[str, list[str], str]:
        """(what each position stores, fidelity lines, what ``top1`` counts) for inspect's page."""

    def report_fields(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The kind's settings shown in inspect's report."""


_KINDS: dict[str, TargetKind] = {}


def register(kind: TargetKind) -> TargetKind:
    """Make ``kind`` known by its name (a later registration of the same name replaces it), ``--targets`` included."""
    _KINDS[kind.name] = kind
    if kind.name not in TARGET_KINDS:
        TARGET_KINDS.append(kind.name)
    return kind


def unregister(name: str) -> None:
    """Forget the kind called ``name`` (a plugin's or a test's)."""
    _KINDS.pop(name, None)
    if name in TARGET_KINDS:
        TARGET_KINDS.remove(name)


def registered() -> tuple[TargetKind, ...]:
    return tuple(_KINDS.values())


def kind_named(name: str) -> TargetKind:
    """The kind called ``name``; UserError naming the known ones otherwise."""
    kind = _KINDS.get(name)
    if kind is None:
        raise UserError(f"unknown target kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return kind


def kind_of(header: dict[str, Any]) -> TargetKind:
    """The kind of the run a header or manifest describes (``topk`` when it does not say)."""
    return kind_named(str(header.get("targets", DEFAULT_KIND)))


def kind_of_columns(names: Sequence[str]) -> TargetKind:
    """The kind of shard rows, told by their columns (rows that lost their header)."""
    for kind in _KINDS.values():
        if kind.id_column in names:
            return kind
    raise UserError(f"shard rows hold no soft-label column of a known kind (columns: {', '.join(names)})")


def kind_of_batch(batch: dict[str, Any]) -> TargetKind:
    """The kind of a collated batch, told by its keys."""
    for kind in _KINDS.values():
        if kind.batch_key in batch:
            return kind
    raise UserError(f"the batch holds no targets of a known kind (keys: {', '.join(map(str, batch))})")


def all_soft_columns() -> tuple[str, ...]:
    """Every soft-label column name of every registered kind."""
    return tuple(name for kind in _KINDS.values() for name in kind.soft_column_names)


def all_logprob_columns() -> tuple[str, ...]:
    """Every soft-label column of every registered kind that holds log-probabilities or their codes."""
    return tuple(name for kind in _KINDS.values() for name in kind.logprob_column_names)


def all_batch_keys() -> tuple[str, ...]:
    """Every batch key that carries targets, of every registered kind."""
    return tuple(key for kind in _KINDS.values() for key in kind.batch_keys)


def soft_columns(header: dict[str, Any]) -> tuple[str, str | None]:
    """The (ids, stored log-probabilities) column names of the run a header or manifest describes."""
    return kind_of(header).columns(header, LogprobCodec.from_header(header))


HISTOGRAM_BINS = 10


def distribution(frame: Any, column: str, upper: float | None = None) -> dict[str, Any]:
    """Mean, p5, p50, p95 and a histogram of ``HISTOGRAM_BINS`` bins over [0, upper] of a polars frame's column."""
    import polars as pl

    values = frame.get_column(column).drop_nulls()
    if values.len() == 0:
        return {"mean": None}
    high = upper if upper is not None else max(float(values.max()), 1e-9)
    edges = [high * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]
    bins = (values.cast(pl.Float64) / high * HISTOGRAM_BINS).floor().clip(0, HISTOGRAM_BINS - 1).cast(pl.Int64)
    counts = bins.value_counts().sort(bins.name)
    histogram = [0] * HISTOGRAM_BINS
    for index, count in zip(counts.get_column(bins.name).to_list(), counts.get_column("count").to_list()):
        histogram[index] = count
    return {
        "mean": float(values.mean()),
        "p5": float(values.quantile(0.05, "linear")),
        "p50": float(values.quantile(0.5, "linear")),
        "p95": float(values.quantile(0.95, "linear")),
        "histogram": {"edges": edges, "counts": histogram},
    }
