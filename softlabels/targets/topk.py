"""From teacher logits to stored soft labels: ensemble, top-k and per-row statistics, in fp32.

Everything here works on the valid positions of a batch, flattened to [N, C]. The full
distribution is needed once per position (the normalisation over all C classes and the entropy),
so positions are processed in chunks of at most ``CHUNK_ELEMENTS`` floats per teacher
(``CPU_CHUNK_ELEMENTS`` on the CPU), converted to fp32 one chunk at a time into buffers
reused across chunks: a chunk stays in cache between passes, and memory does not grow with batch
size x sequence length x vocabulary.

One teacher takes few passes over the vocabulary per chunk: the fp32 copy, the block maxima and
a top-k of the raw logits (``block_topk``; the top-k of the logits is the top-k of the log-probabilities,
and its first value is the maximum), a shift by that maximum, one exp, and two sums over it (the
normaliser s = sum e^(x - max) and d = sum e^(x - max) (x - max)). Then, per position,
log-sum-exp = max + log s, log p_i = (x_i - max) - log s for the k stored ids, and the entropy is
log s - d / s; the fidelity figures come from these k log-probabilities and the entropy alone
(``softlabels.fidelity``). Ensembles first combine the members' log-softmax over the whole
vocabulary (``ensemble_logprobs``), then take the same top-k and entropy of the combination.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..codec import CODES_COLUMN, LOGPROB_COLUMN, LogprobCodec
from ..errors import UserError
from ..fidelity import Fidelity
from ..losses import kd_loss_per_position
from ..schema import id_type
from .base import HostTargets, distribution, register
from .rows import TopKRows

__all__ = ["TOPK", "TopK", "DEFAULT_TOP_K", "usable_positions", "CHUNK_ELEMENTS", "CPU_CHUNK_ELEMENTS", "TOPK_BLOCK", "SoftLabels", "EnsembleChunk", "ensemble_logprobs", "ensemble_chunks",
           "block_topk", "row_mean", "soft_labels", "valid_positions"]

CHUNK_ELEMENTS = 1 << 23
"""At most this many floats per teacher per chunk (32 MB in fp32); the chunk on an accelerator."""

CPU_CHUNK_ELEMENTS = 1 << 22
"""Floats per teacher per chunk on the CPU: 16 MB in fp32, 85 positions at C = 49,152. Smaller
chunks stay in cache between passes, but every pass is a parallel region whose threads must all be
running to finish it, which on a machine with more runnable threads than cores costs a scheduler
time slice each; at 32 MB and above every buffer is a fresh mapping (glibc's largest recycled
allocation), faulted in and zeroed by the kernel."""

DEFAULT_TOP_K = 20
"""k when ``--top-k`` is not given (or V, when smaller)."""

TOPK_BLOCK = 64
"""Classes per block in ``block_topk``'s first stage (C // TOPK_BLOCK blocks)."""


@dataclass
class SoftLabels:
    """Soft labels of N positions belonging to B rows.

    Attributes:
        ids: [N, k] class ids, most probable first (int64).
        logprobs: [N, k] float32 log-probabilities under the (ensemble) teacher at T=1.
        confidence: [B] mean top-1 probability of each row's positions.
        entropy: [B] mean full-distribution entropy (nats) of each row's positions.
        agreement: [B] mean fraction of teachers agreeing with the ensemble argmax, or None for one teacher.
        captured_mass: [N] probability mass of the k stored ids.
        stored_kl: [N] KL(full || stored-with-uniform-tail) in nats, the stored values rounded by
            the shard's codec (see ``softlabels.fidelity``).
        usable: [N] bool, True where every teacher's logits define a distribution: no NaN or +Inf
            and not all -Inf (-Inf alone is a masked class). The other fields of an unusable
            position, and the row statistics of its row, are meaningless.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    agreement: torch.Tensor | None
    captured_mass: torch.Tensor
    stored_kl: torch.Tensor
    usable: torch.Tensor

    def of_rows(self, keep: torch.Tensor, positions_per_row: torch.Tensor) -> "SoftLabels":
        """The labels of the rows where ``keep`` (bool [B]) is True; ``positions_per_row`` int64 [B]."""
        row_of = torch.repeat_interleave(torch.arange(len(positions_per_row), device=keep.device), positions_per_row.to(keep.device))
        kept = keep[row_of]
        return SoftLabels(
            ids=self.ids[kept], logprobs=self.logprobs[kept], confidence=self.confidence[keep], entropy=self.entropy[keep],
            agreement=None if self.agreement is None else self.agreement[keep], captured_mass=self.captured_mass[kept],
            stored_kl=self.stored_kl[kept], usable=self.usable[kept],
        )

    def to_host(self, sample_ids: Sequence[str], positions_per_row: torch.Tensor, fidelity: Fidelity) -> HostTargets:
        """The ids and log-probabilities on the host; records captured mass and KL into ``fidelity``."""
        host = HostTargets((self.ids.cpu().numpy(), self.logprobs.cpu().numpy()), self.confidence.cpu().numpy(),
                           self.entropy.cpu().numpy(), None if self.agreement is None else self.agreement.cpu().numpy())
        fidelity.add(self.captured_mass.cpu().numpy(), self.stored_kl.cpu().numpy())
        return host


def usable_positions(logits: torch.Tensor) -> torch.Tensor:
    """[N] True where a position's logits define a distribution: no NaN or +Inf, and not all -Inf.

    -Inf alone is a legitimate logit (a masked class, a padded vocabulary entry).
    """
    finite_sums = logits.sum(dim=-1).isfinite()  # one pass, no [N, V] temporary
    if bool(finite_sums.all()):
        return finite_sums
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    return ~bad


def valid_positions(logits: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a batch's valid positions.

    Args:
        logits: [B, C] (one position per row) or [B, T, C].
        lengths: int64 [B] valid positions per row, or None when every position is valid.

    Returns:
        ([N, C] logits of valid positions in row-major order, int64 [B] positions per row).
    """
    batch = logits.shape[0]
    if logits.dim() == 2:
        return logits, torch.ones(batch, dtype=torch.int64, device=logits.device)
    steps = logits.shape[1]
    lengths = None if lengths is None else lengths.to(logits.device)
    if lengths is None or bool((lengths == steps).all()):  # every position valid: a view, no copy
        return logits.reshape(batch * steps, -1), torch.full((batch,), steps, dtype=torch.int64, device=logits.device)
    if int(lengths.max()) > steps:
        raise ValueError(f"teacher returned {steps} positions but inputs have up to {int(lengths.max())}")
    mask = torch.arange(steps, device=logits.device)[None, :] < lengths[:, None]
    return logits[mask], lengths


def ensemble_logprobs(member_logits: list[torch.Tensor], mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Combine teachers into one log-distribution over the full vocabulary.

    Args:
        member_logits: one [n, C] tensor per teacher.
        mode: ``probs`` averages probabilities (log of the mean); ``logprobs`` averages
            log-probabilities and renormalises (a normalised geometric mean).

    Returns:
        ([n, C] fp32 ensemble log-probabilities, the members' [n, C] fp32 log-probabilities).
    """
    members = [torch.log_softmax(logits.float(), dim=-1) for logits in member_logits]
    if len(members) == 1:
        return members[0], members
    stacked = torch.stack(members)
    if mode == "probs":
        return torch.logsumexp(stacked, dim=0) - math.log(len(members)), members
    if mode == "logprobs":
        return torch.log_softmax(stacked.mean(dim=0), dim=-1), members
    raise ValueError(f"unknown ensemble mode {mode!r}")


def block_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row, largest first: what ``torch.topk(values, k, sorted=True)`` returns.

    Args:
        values: [n, C] float (NaN counts as largest, as in ``torch.topk``).
        k: 1 <= k <= C.

    Returns:
        ([n, k] values, int64 [n, k] their class ids). Among equal values the ids chosen and their
        order are unspecified (as in ``torch.topk``), but the same for the same input.

    On the CPU, for C >= 4 k ``TOPK_BLOCK``, the classes are cut into blocks of ``TOPK_BLOCK``
    and the exact top-k is taken among the k blocks of largest maximum plus the C mod
    ``TOPK_BLOCK`` classes after the last whole block: every value above the k-th largest sits in a
    block whose maximum is one of fewer than k such values, and the chosen blocks hold at least k
    values not below it. A full ``torch.topk`` row costs several times the block maxima on the
    CPU; accelerators have a fast top-k of their own.
    """
    rows, classes = values.shape
    groups = classes // TOPK_BLOCK
    if groups < 4 * k or values.device.type != "cpu":
        return torch.topk(values, k, dim=-1, sorted=True)
    span = groups * TOPK_BLOCK
    blocks = values[:, :span].reshape(rows, groups, TOPK_BLOCK)  # block j: classes [j B, (j + 1) B)
    chosen = torch.topk(blocks.amax(dim=-1), k, dim=-1, sorted=False).indices  # [n, k]
    candidates = blocks.gather(1, chosen[:, :, None].expand(rows, k, TOPK_BLOCK)).reshape(rows, k * TOPK_BLOCK)
    if span < classes:  # the classes after the last whole block are always candidates
        candidates = torch.cat([candidates, values[:, span:]], dim=1)
    best, where = torch.topk(candidates, k, dim=-1, sorted=True)
    in_blocks = chosen.gather(1, (where // TOPK_BLOCK).clamp(max=k - 1)) * TOPK_BLOCK + where % TOPK_BLOCK
    return best, torch.where(where < k * TOPK_BLOCK, in_blocks, where - k * TOPK_BLOCK + span)


def _entropy_of_logprobs(log_p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim of [n, C] log-probabilities; a masked class (-inf) adds 0."""
    p = log_p.exp()
    return -torch.nansum(p.mul_(log_p), dim=-1)  # 0 x -inf is NaN: nansum counts it as 0 log 0 = 0


def _stored_kl(log_p_topk: torch.Tensor, entropy: torch.Tensor, classes: int, codec: LogprobCodec) -> torch.Tensor:
    """KL(full || stored) per position from the entropy and the k true log-probabilities [n, k]."""
    k = log_p_topk.shape[-1]
    stored = codec.roundtrip(log_p_topk)
    p_topk = log_p_topk.exp()
    cross = (p_topk * stored).sum(dim=-1)
    kl = -entropy - cross
    if classes > k:
        tail = (1.0 - p_topk.sum(dim=-1)).clamp(min=0.0)
        stored_tail = (1.0 - stored.exp().sum(dim=-1)).clamp(min=1e-12)
        kl = kl - tail * (torch.log(stored_tail) - math.log(classes - k))
    return kl.clamp(min=0.0)


class _SingleTeacher:
    """Top-k log-probabilities and entropy of one teacher's chunks, from raw logits in few passes."""

    def __init__(self, rows: int, classes: int, device: torch.device) -> None:
        self.rows, self.classes, self.device = rows, classes, device
        self.shifted = torch.empty(rows, classes, dtype=torch.float32, device=device)
        self.exp = torch.empty(rows, classes, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, C] logits -> ([n, k] ids, [n, k] fp32 log-probabilities, [n] entropy, [n] usable).

        A position is usable when its largest logit is finite: ``block_topk`` ranks NaN first, so
        NaN, +Inf and all -Inf all leave a non-finite maximum.
        """
        rows = logits.shape[0]
        if logits.dtype == torch.float32:  # top-k of the input itself, the shift writes the copy
            values, ids = block_topk(logits, k)
            shifted = torch.sub(logits, values[:, :1], out=self.shifted[:rows])
        else:  # a bf16 -> fp32 copy first: subtracting across dtypes is several times slower
            shifted = self.shifted[:rows].copy_(logits)
            values, ids = block_topk(shifted, k)
            shifted.sub_(values[:, :1])
        peak = values[:, :1]  # x - max <= 0, so every exp <= 1
        exp = torch.exp(shifted, out=self.exp[:rows])
        normaliser = exp.sum(dim=-1)
        # sum e (x - max); a masked class gives 0 x -inf = NaN, which nansum counts as 0
        weighted = torch.nansum(exp.mul_(shifted), dim=-1)
        log_normaliser = normaliser.log()
        logprobs = (values - peak) - log_normaliser[:, None]
        entropy = log_normaliser - weighted / normaliser
        return ids, logprobs, entropy, peak[:, 0].isfinite()


_held = threading.local()


def _single_teacher(rows: int, classes: int, device: torch.device) -> _SingleTeacher:
    """The calling thread's buffers for chunks of up to ``rows`` x ``classes`` on ``device``, kept from
    call to call on the CPU: new ones of this size are fresh mappings, faulted in page by page."""
    if device.type != "cpu":
        return _SingleTeacher(rows, classes, device)
    held = getattr(_held, "single", None)
    if held is None or held.classes != classes or held.device != device or held.rows < rows:
        held = _held.single = _SingleTeacher(rows, classes, device)
    return held


def soft_labels(
    member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, top_k: int, mode: str, codec: LogprobCodec | None = None
) -> SoftLabels:
    """Top-k soft labels and row statistics for N valid positions.

    Args:
        member_logits: one [N, C] tensor per teacher (any float dtype; computed in fp32 chunk by chunk).
        positions_per_row: int64 [B], summing to N.
        top_k: k.
        mode: ensemble mode, see ``ensemble_logprobs`` (unused for one teacher).
        codec: how the shard stores log-probabilities (float16 by default); only the fidelity
            figures depend on it.
    """
    codec = codec or LogprobCodec()
    total, classes = member_logits[0].shape
    device = member_logits[0].device
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    chunk = max(1, budget // max(classes, 1))
    single = _single_teacher(min(chunk, total), classes, device) if len(member_logits) == 1 and total else None
    ids, logprobs, entropy, agree, usable = [], [], [], [], []
    for begin in range(0, total, chunk):
        pieces = [logits[begin : begin + chunk] for logits in member_logits]
        if single is not None:
            indices, values, spread, defined = single(pieces[0], top_k)
        else:
            log_p, members = ensemble_logprobs(pieces, mode)
            values, indices = block_topk(log_p, top_k)
            spread = _entropy_of_logprobs(log_p)
            best = indices[:, 0]
            agree.append(torch.stack([m.argmax(dim=-1) == best for m in members]).float().mean(dim=0))
            # a member's log-softmax has a finite maximum (-log sum e^(x - max)) exactly when its logits are usable
            defined = torch.stack([m.amax(dim=-1).isfinite() for m in members]).all(dim=0)
        ids.append(indices)
        logprobs.append(values)
        entropy.append(spread)
        usable.append(defined)
    all_logprobs = torch.cat(logprobs) if logprobs else torch.empty(0, top_k, device=device)
    all_entropy = torch.cat(entropy) if entropy else torch.empty(0, device=device)
    return SoftLabels(
        ids=torch.cat(ids) if ids else torch.empty(0, top_k, dtype=torch.int64, device=device),
        logprobs=all_logprobs,
        confidence=row_mean(all_logprobs[:, 0].exp(), positions_per_row),
        entropy=row_mean(all_entropy, positions_per_row),
        agreement=row_mean(torch.cat(agree), positions_per_row) if agree else None,
        captured_mass=all_logprobs.exp().sum(dim=-1),
        stored_kl=_stored_kl(all_logprobs, all_entropy, classes, codec),
        usable=torch.cat(usable) if usable else torch.empty(0, dtype=torch.bool, device=device),
    )


def row_mean(flat: torch.Tensor, positions_per_row: torch.Tensor) -> torch.Tensor:
    """[B] float32 mean of each row's values: ``flat`` [N] holds rows' positions in order, ``positions_per_row``
    int64 [B] sums to N; a row without positions gives 0."""
    flat = flat.float()
    row_of = torch.repeat_interleave(torch.arange(len(positions_per_row), device=flat.device), positions_per_row.to(flat.device))
    counts = positions_per_row.clamp(min=1).float().to(flat.device)
    return torch.zeros(len(counts), device=flat.device).index_add_(0, row_of, flat) / counts


@dataclass
class EnsembleChunk:
    """The full (ensemble) distribution of one chunk of positions and its statistics.

    Attributes:
        begin: the chunk's first position among the N.
        logprobs: [n, C] float32 (ensemble) log-probabilities at T=1, normalised over C.
        entropy: [n] entropy in nats.
        agreement: [n] fraction of teachers whose argmax is the ensemble's, or None for one teacher.
    """

    begin: int
    logprobs: torch.Tensor
    entropy: torch.Tensor
    agreement: torch.Tensor | None


def ensemble_chunks(member_logits: list[torch.Tensor], mode: str) -> Iterator[EnsembleChunk]:
    """The (ensemble) log-probabilities of N positions, chunk by chunk, for consumers of the whole
    distribution (sampled targets); chunks of ``CPU_CHUNK_ELEMENTS`` floats on the CPU, else
    ``CHUNK_ELEMENTS``.

    Args:
        member_logits: one [N, C] tensor per teacher (any float dtype; computed in fp32).
        mode: ensemble mode, see ``ensemble_logprobs`` (unused for one teacher).
    """
    total, classes = member_logits[0].shape
    budget = CPU_CHUNK_ELEMENTS if member_logits[0].device.type == "cpu" else CHUNK_ELEMENTS
    chunk = max(1, min(total, budget // max(classes, 1)))
    for begin in range(0, total, chunk):
        log_p, members = ensemble_logprobs([logits[begin : begin + chunk] for logits in member_logits], mode)
        agreement = None
        if len(members) > 1:
            best = log_p.argmax(dim=-1)
            agreement = torch.stack([m.argmax(dim=-1) == best for m in members]).float().mean(dim=0)
        yield EnsembleChunk(begin, log_p, _entropy_of_logprobs(log_p), agreement)


def nested_fixed(flat: np.ndarray, k: int, positions: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """list<fixed_size_list<k>> of [N, k] values for rows of ``positions`` positions each."""
    per_position = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), k)
    offsets = np.zeros(len(positions) + 1, dtype=np.int32)
    np.cumsum(positions, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), per_position)


class TopK:
    """``--targets topk``: per position the k most probable class ids and their log-probabilities at T=1."""

    name = "topk"
    manifest_keys = ("top_k",)
    size_key = "top_k"
    batch_keys = ("topk_ids", "topk_logprobs")
    batch_key = "topk_ids"
    id_column = "topk_ids"
    soft_column_names = ("topk_ids", LOGPROB_COLUMN, CODES_COLUMN)
    inspect_figures = ("captured_mass",)
    logprob_column_names = (LOGPROB_COLUMN, CODES_COLUMN)

    def prepare(self, config: Any, vocab_size: int) -> None:
        if config.top_k is None:
            config.top_k = min(DEFAULT_TOP_K, vocab_size)
        elif config.top_k > vocab_size:
            raise UserError(f"--top-k {config.top_k} exceeds the teachers' vocabulary size {vocab_size}")

    def settings(self, config: Any) -> dict[str, Any]:
        return {"top_k": config.top_k}  # a top-k run's settings (and fingerprint) are those of earlier releases

    def header(self, config: Any) -> dict[str, Any]:
        return {"targets": self.name, "top_k": config.top_k}

    def fields(self, vocab_size: int, header: dict[str, Any], codec: LogprobCodec) -> list[pa.Field]:
        top_k = header["top_k"]
        return [pa.field("topk_ids", pa.list_(pa.list_(id_type(vocab_size), top_k))),
                pa.field(codec.column, pa.list_(pa.list_(codec.arrow_type, top_k)), metadata=codec.field_metadata())]

    def columns(self, header: dict[str, Any], codec: LogprobCodec) -> tuple[str, str]:
        return "topk_ids", codec.column

    def compute(self, member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, run: Any) -> SoftLabels:
        return soft_labels(member_logits, positions_per_row, run.config.top_k, run.config.ensemble, run.codec)

    def join(self, parts: list[Any], header: dict[str, Any]) -> Any:
        k = header["top_k"]
        if not parts:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return np.concatenate([ids for ids, _ in parts]), np.concatenate([logprobs for _, logprobs in parts])

    def arrays(self, data: Any, positions: np.ndarray, vocab_size: int, codec: LogprobCodec, header: dict[str, Any]) -> list[pa.Array]:
        ids, logprobs = data
        k = header["top_k"]
        ids = ids.astype(id_type(vocab_size).to_pandas_dtype(), copy=False)
        return [nested_fixed(ids, k, positions, id_type(vocab_size)), nested_fixed(codec.encode_numpy(logprobs), k, positions, codec.arrow_type)]

    def fidelity_summary(self, fidelity: Fidelity) -> dict[str, float]:
        return fidelity.summary()

    def describe_fidelity(self, soft_per_position: float, fidelity: dict[str, float]) -> str:
        return (f"({soft_per_position:.1f} for top-k ids and log-probs); "
                f"captured top-k mass mean {fidelity['captured_mass_mean']:.4f}, p5 {fidelity['captured_mass_p5']:.3f}; "
                f"KL(full || stored) {fidelity['kl_full_vs_stored_mean']:.2e} nats")

    def read_columns(self, header: dict[str, Any], codec: LogprobCodec) -> list[str]:
        return ["topk_ids", codec.column]

    def codec_without_header(self, schema: pa.Schema) -> LogprobCodec:
        return LogprobCodec.from_columns(schema)

    def row_options(self, schema: pa.Schema, header: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def rows(self, table: pa.Table, codec: LogprobCodec, options: dict[str, Any],
             place: Callable[[np.ndarray], Any]) -> Any:
        return TopKRows(table, codec, place)

    def loss_per_position(self, logits: torch.Tensor, pick: Callable[[str], torch.Tensor], batch: dict[str, Any],
                          temperature: float, tail: str) -> torch.Tensor:
        return kd_loss_per_position(logits, pick("topk_ids"), pick("topk_logprobs"), temperature, tail)

    def teacher_top1(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["topk_ids"][..., 0]

    def bias_warning(self, temperature: float, header: dict[str, Any]) -> str | None:
        return None  # the top-k loss is exact on what it stores

    def inspect(self, scan: Any, manifest: dict[str, Any], codec: LogprobCodec) -> tuple[dict[str, Any], Any]:
        import polars as pl

        positions = scan.select(
            pl.col(codec.column).explode().arr.to_list().list.eval(codec.decode_polars(pl.element()).exp()).list.sum().alias("mass"),
            pl.col("topk_ids").explode().arr.first().alias("top1"),
        ).collect()
        return {"captured_mass": distribution(positions, "mass", upper=1.0)}, positions

    def inspect_lines(self, report: dict[str, Any]) -> tuple[str, list[str], str]:
        fidelity = report.get("fidelity") or {}
        lines = []
        if "kl_full_vs_stored_mean" in fidelity:
            lines.append(f"KL(full || stored with uniform tail): {fidelity['kl_full_vs_stored_mean']:.3e} nats per position")
        return f"top-k {report['top_k']}", lines, "most frequent top-1 classes"

    def report_fields(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {}


TOPK = register(TopK())
