"""Sampled teacher targets (Random-Sampling KD, Anshumann et al., ACL 2025): draws, keys and storage.

Per position, ``samples`` ids are drawn with replacement from a proposal q over the full vocabulary:
the teacher itself (q = p, proposal temperature 1) or the teacher at a proposal temperature t
(q = p^(1/t) / Z_t). What is kept per position is variable-length: the distinct ids drawn (at most
``samples`` of them), most frequent first and ties by smaller id, how often each was drawn, and the
teacher's log p(id) at T=1; with t != 1 also log Z_t, so the loss can weight a draw by p/q exactly.
``softlabels.losses.sampled_kd_loss_per_position`` turns them into an unbiased KD loss.

Draws are reproducible from what identifies a position, never from how work was batched:

* ``position_keys``: a 64-bit key per position from sha256(fingerprint, sample id) mixed with the
  position's index in its row (splitmix64's finaliser, vectorised in numpy uint64);
* ``uniforms``: draw j of key k is the j-th output of a SplitMix64 stream seeded with k, as a float64
  in [0, 1) from its top 53 bits (counter-based: no state carried between positions or calls);
* ``draw_ids``: inverse-CDF sampling, a float64 cumulative sum of q per position and a searchsorted.

So the draws of a position depend only on (fingerprint, sample id, position index) and that
position's teacher probabilities: resume, ranks, Ray actors and any ``--batch-size`` give the same
ids. Positions are processed in chunks of ``CPU_CHUNK_ELEMENTS / 2`` float64 values on the CPU
(16 MB) or ``CHUNK_ELEMENTS / 2`` (32 MB) on an accelerator,
in one scratch block reused for every chunk; the cost per position is a few in-place passes over
V (copy to float64, subtract the max, exp, cumulative sum) and a binary search per draw.

Storage (``sample_fields`` / ``softlabels.targets.sampled.sample_arrays``), one row per sample as for top-k, with
per-position lists of variable length (the distinct ids):

| column | Arrow type |
|---|---|
| ``sample_ids`` | list<list<uint16 or uint32>> |
| ``sample_counts`` | list<list<uint8>> (uint16 when samples > 255) |
| ``sample_logprobs`` (``sample_logprob_codes`` for uint8) | list<list<float32, float16 or uint8>> via the run's codec |
| ``sample_log_normalizer`` | list<float32>, only when the proposal temperature is not 1 |

Variable length rather than N fixed slots: an LLM teacher is peaked, so most positions repeat a few
ids and the bytes follow the distinct ids (uint16 id + uint8 count + a 2-byte log-prob), not N.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..schema import (
    MAX_UINT8_SAMPLES,
    SAMPLE_CODES_COLUMN,
    SAMPLE_COUNTS_COLUMN,
    SAMPLE_IDS_COLUMN,
    SAMPLE_LOGPROBS_COLUMN,
    SAMPLE_NORMALIZER_COLUMN,
    sample_fields,
    sample_logprob_column,
)
from .topk import CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS, ensemble_chunks, row_mean

__all__ = [
    "SAMPLER",
    "SAMPLE_IDS_COLUMN",
    "SAMPLE_COUNTS_COLUMN",
    "SAMPLE_LOGPROBS_COLUMN",
    "SAMPLE_CODES_COLUMN",
    "SAMPLE_NORMALIZER_COLUMN",
    "MAX_UINT8_SAMPLES",
    "SampledTargets",
    "PaddedSamples",
    "SampledLabels",
    "sampled_labels",
    "mix64",
    "row_keys",
    "position_keys",
    "uniforms",
    "draw_ids",
    "draw_targets",
    "sample_header_fields",
    "sample_logprob_column",
    "sample_fields",
]

SAMPLER = "splitmix64-inverse-cdf.v1"
"""Names the key derivation and the draw algorithm; a change to either must change it (and so the fingerprint)."""

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)
POSITION_SALT = np.uint64(0x5D588B656C078965)
FLOAT64_FRACTION = 2.0**-53


@dataclass
class SampledTargets:
    """The distinct drawn ids of n positions, flat, position i at ``offsets[i]:offsets[i + 1]``.

    Attributes:
        ids: [U] int64 distinct ids, per position most frequent first, ties by smaller id.
        counts: [U] int64 times each id was drawn; a position's counts sum to ``samples``.
        logprobs: [U] float32 teacher log p(id) at T=1 over the full vocabulary.
        offsets: [n + 1] int64, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == U``.
        log_normalizer: [n] float32 log Z_t = log sum_v p(v)^(1/t) of each position's proposal
            (about 0 at t = 1, where it is not stored).
        samples: N, the draws per position.
        proposal_temperature: t.
    """

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor
    log_normalizer: torch.Tensor
    samples: int
    proposal_temperature: float = 1.0

    @property
    def positions(self) -> int:
        return len(self.offsets) - 1

    def unique_per_position(self) -> torch.Tensor:
        """[n] int64 number of distinct ids of each position."""
        return self.offsets[1:] - self.offsets[:-1]

    def padded(self, width: int | None = None) -> PaddedSamples:
        """The [n, m] form the loss takes; m = ``width`` or the most distinct ids of any position.

        Padding slots have id 0, count 0 and log-prob 0 (the loss ignores count-0 slots).
        """
        unique = self.unique_per_position()
        most = int(unique.max()) if self.positions and len(self.ids) else 0
        width = most if width is None else width
        if width < most:
            raise ValueError(f"width {width} is below the {most} distinct ids of a position")
        device = self.ids.device
        slot = torch.arange(width, device=device)[None, :]
        filled = slot < unique[:, None]
        ids = torch.zeros(self.positions, width, dtype=torch.int64, device=device)
        counts = torch.zeros_like(ids)
        logprobs = torch.zeros(self.positions, width, dtype=torch.float32, device=device)
        ids[filled] = self.ids
        counts[filled] = self.counts
        logprobs[filled] = self.logprobs.float()
        return PaddedSamples(ids, counts, logprobs, self.log_normalizer.float(), self.proposal_temperature)

    @classmethod
    def concat(cls, parts: Sequence[SampledTargets]) -> SampledTargets:
        """Positions of ``parts`` one after another (all drawn with the same samples and proposal)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({(p.samples, p.proposal_temperature) for p in parts}) > 1:
            raise ValueError("parts were drawn with different samples or proposal temperatures")
        offsets = [parts[0].offsets[:1]]
        base = 0
        for part in parts:
            offsets.append(part.offsets[1:] + base)
            base += int(part.offsets[-1])
        return cls(
            ids=torch.cat([p.ids for p in parts]),
            counts=torch.cat([p.counts for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            offsets=torch.cat(offsets),
            log_normalizer=torch.cat([p.log_normalizer for p in parts]),
            samples=parts[0].samples,
            proposal_temperature=parts[0].proposal_temperature,
        )


@dataclass
class PaddedSamples:
    """Sampled targets padded to m slots per position; see ``softlabels.losses.kd_loss``.

    Attributes:
        ids: [n, m] int64 (0 in padding slots).
        counts: [n, m] int64 (0 in padding slots).
        logprobs: [n, m] float32 teacher log p at T=1 (0 in padding slots).
        log_normalizer: [n] float32 log Z_t of the proposal.
        proposal_temperature: t.
    """

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    log_normalizer: torch.Tensor
    proposal_temperature: float


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (a bijection that scrambles every bit)."""
    z = np.asarray(values, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= MIX_1
        z ^= z >> np.uint64(27)
        z *= MIX_2
        z ^= z >> np.uint64(31)
    return z


def row_keys(fingerprint: str, sample_ids: Sequence[str]) -> np.ndarray:
    """[B] uint64: the first 8 bytes (little-endian) of sha256(fingerprint NUL sample_id) per row."""
    digests = b"".join(hashlib.sha256(f"{fingerprint}\0{sample_id}".encode()).digest()[:8] for sample_id in sample_ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def position_keys(fingerprint: str, sample_ids: Sequence[str], positions_per_row: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One 64-bit key per position, from the run, the row's sample id and the position's index in the row.

    Args:
        fingerprint: the run fingerprint.
        sample_ids: B sample ids.
        positions_per_row: int [B] positions of each row (the row's positions are indexed 0, 1, ...).

    Returns:
        [N] int64 keys (the uint64 bits), N = sum(positions_per_row), rows in order.
    """
    counts = np.asarray(torch.as_tensor(positions_per_row).cpu(), dtype=np.int64)
    if len(counts) != len(sample_ids):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(counts)} rows of positions")
    rows = np.repeat(row_keys(fingerprint, sample_ids), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    index = (np.arange(len(rows), dtype=np.int64) - starts).astype(np.uint64)
    with np.errstate(over="ignore"):
        keys = mix64(rows ^ mix64(index * GOLDEN_GAMMA + POSITION_SALT))
    return torch.from_numpy(keys.view(np.int64))


def _as_uint64(keys: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        keys = keys.cpu().numpy()
    keys = np.asarray(keys)
    if keys.dtype == np.int64:
        return keys.view(np.uint64)
    if keys.dtype != np.uint64:
        raise TypeError(f"keys must be int64 or uint64, got {keys.dtype}")
    return keys


def uniforms(keys: torch.Tensor | np.ndarray, count: int) -> np.ndarray:
    """[n, count] float64 in [0, 1): draw j of key k is the j-th SplitMix64 output seeded with k.

    Args:
        keys: [n] int64 or uint64.
        count: draws per key.
    """
    seeds = _as_uint64(keys)
    with np.errstate(over="ignore"):
        steps = (np.arange(1, count + 1, dtype=np.uint64) * GOLDEN_GAMMA)[None, :]
        bits = mix64(seeds[:, None] + steps)
    return (bits >> np.uint64(11)).astype(np.float64) * FLOAT64_FRACTION


def _check(logprobs: torch.Tensor, keys: torch.Tensor | np.ndarray, samples: int, proposal_temperature: float) -> np.ndarray:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [n, V], got shape {tuple(logprobs.shape)}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if not (proposal_temperature > 0 and math.isfinite(proposal_temperature)):
        raise ValueError(f"proposal temperature must be positive and finite, got {proposal_temperature}")
    seeds = _as_uint64(keys)
    if seeds.shape != (logprobs.shape[0],):
        raise ValueError(f"{logprobs.shape[0]} positions but keys of shape {seeds.shape}")
    return seeds


def _draw_chunk(logprobs: torch.Tensor, seeds: np.ndarray, samples: int, proposal_temperature: float,
                buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, samples] int64 drawn ids, [n] float64 log Z_t) for one chunk of positions.

    ``buffer`` is a float64 [>= n, V] scratch block, reused across chunks: the cumulative sum is built
    in place (copy, subtract the max, scale, exp, cumsum), with no [n, V] allocation per chunk.
    """
    cdf = buffer[: len(logprobs)]
    cdf.copy_(logprobs)
    top = cdf.max(dim=-1, keepdim=True).values
    cdf.sub_(top)
    if proposal_temperature != 1.0:
        cdf.div_(proposal_temperature)
        top = top / proposal_temperature
    cdf.exp_().cumsum_(dim=-1)
    total = cdf[:, -1:]
    targets = torch.from_numpy(uniforms(seeds, samples)).to(cdf.device) * total
    drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=logprobs.shape[-1] - 1)
    return drawn, (total.log() + top).squeeze(-1)


def _scratch(logprobs: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(positions per chunk, the float64 scratch block of one chunk)."""
    elements = CPU_CHUNK_ELEMENTS if logprobs.device.type == "cpu" else CHUNK_ELEMENTS
    chunk = max(1, elements // 2 // max(logprobs.shape[-1], 1))
    rows = min(chunk, max(logprobs.shape[0], 1))
    return chunk, torch.empty(rows, logprobs.shape[-1], dtype=torch.float64, device=logprobs.device)


def draw_ids(logprobs: torch.Tensor, keys: torch.Tensor | np.ndarray, samples: int, proposal_temperature: float = 1.0) -> torch.Tensor:
    """The raw draws, in draw order: ``samples`` ids per position from q proportional to p^(1/t).

    Args:
        logprobs: [n, V] teacher log-probabilities at T=1 (any float dtype; summed in float64).
        keys: [n] int64 or uint64 position keys (``position_keys``).
        samples: N >= 1.
        proposal_temperature: t > 0.

    Returns:
        [n, N] int64 ids on ``logprobs``' device. A class with p = 0 is never drawn.
    """
    seeds = _check(logprobs, keys, samples, proposal_temperature)
    chunk, buffer = _scratch(logprobs)
    pieces = [_draw_chunk(logprobs[b : b + chunk], seeds[b : b + chunk], samples, proposal_temperature, buffer)[0]
              for b in range(0, logprobs.shape[0], chunk)]
    return torch.cat(pieces) if pieces else torch.empty(0, samples, dtype=torch.int64, device=logprobs.device)


def _distinct(drawn: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct ids of [n, N] draws: (ids [U], counts [U], distinct per position [n]); count desc, id asc."""
    samples = drawn.shape[1]
    ordered = drawn.sort(dim=1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(dim=1) - 1
    run_counts = torch.zeros_like(ordered).scatter_add_(1, run, torch.ones_like(ordered))
    run_ids = torch.zeros_like(ordered).scatter_(1, run, ordered)
    distinct = starts.sum(dim=1)
    filled = torch.arange(samples, device=drawn.device)[None, :] < distinct[:, None]
    rank = torch.where(filled, (samples - run_counts) * vocab + run_ids, torch.full_like(run_ids, torch.iinfo(torch.int64).max))
    order = rank.argsort(dim=1)
    return run_ids.gather(1, order)[filled], run_counts.gather(1, order)[filled], distinct


def draw_targets(logprobs: torch.Tensor, keys: torch.Tensor | np.ndarray, samples: int, proposal_temperature: float = 1.0) -> SampledTargets:
    """Draw ``samples`` ids per position from the proposal and keep the distinct ones with their counts.

    Args:
        logprobs: [n, V] float32 teacher log-probabilities at T=1 (the ensemble's, normalised over V).
        keys: [n] int64 or uint64 position keys (``position_keys``); the draws of a position depend
            only on its key and its row of ``logprobs``, so any split of the n positions into calls
            gives the same result.
        samples: N >= 1 draws per position, with replacement.
        proposal_temperature: t; q = p at 1, else q = p^(1/t) / Z_t.

    Returns:
        The positions' distinct ids, counts, teacher log-probabilities and log Z_t, on ``logprobs``'
        device.
    """
    seeds = _check(logprobs, keys, samples, proposal_temperature)
    vocab = logprobs.shape[-1]
    chunk, buffer = _scratch(logprobs)
    ids, counts, values, distinct, normalizers = [], [], [], [], []
    for begin in range(0, logprobs.shape[0], chunk):
        block = logprobs[begin : begin + chunk]
        drawn, log_normalizer = _draw_chunk(block, seeds[begin : begin + chunk], samples, proposal_temperature, buffer)
        chunk_ids, chunk_counts, chunk_distinct = _distinct(drawn, vocab)
        rows = torch.repeat_interleave(torch.arange(len(block), device=block.device), chunk_distinct)
        ids.append(chunk_ids)
        counts.append(chunk_counts)
        values.append(block[rows, chunk_ids].float())
        distinct.append(chunk_distinct)
        normalizers.append(log_normalizer.float())
    device = logprobs.device
    per_position = torch.cat(distinct) if distinct else torch.empty(0, dtype=torch.int64, device=device)
    offsets = torch.zeros(len(per_position) + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_position, dim=0, out=offsets[1:])
    return SampledTargets(
        ids=torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64, device=device),
        counts=torch.cat(counts) if counts else torch.empty(0, dtype=torch.int64, device=device),
        logprobs=torch.cat(values) if values else torch.empty(0, device=device),
        offsets=offsets,
        log_normalizer=torch.cat(normalizers) if normalizers else torch.empty(0, device=device),
        samples=samples,
        proposal_temperature=float(proposal_temperature),
    )


@dataclass
class SampledLabels:
    """Sampled targets and row statistics of N positions belonging to B rows (what a shard stores).

    Attributes:
        targets: the positions' distinct drawn ids, counts and teacher log-probabilities.
        confidence: [B] mean top-1 probability of each row's positions (the full distribution's).
        entropy: [B] mean full-distribution entropy (nats) of each row's positions.
        agreement: [B] mean fraction of teachers agreeing with the ensemble argmax, or None for one teacher.
        drawn_mass: [N] teacher probability of each position's distinct drawn ids.
    """

    targets: SampledTargets
    confidence: torch.Tensor
    entropy: torch.Tensor
    agreement: torch.Tensor | None
    drawn_mass: torch.Tensor


def sampled_labels(member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, keys: torch.Tensor | np.ndarray,
                   samples: int, proposal_temperature: float, mode: str) -> SampledLabels:
    """Sampled targets and row statistics for N valid positions, the ``generate --targets sample`` compute.

    Args:
        member_logits: one [N, C] tensor per teacher (any float dtype; the ensemble in fp32 chunk by chunk).
        positions_per_row: int64 [B], summing to N.
        keys: [N] int64 position keys (``position_keys`` of the rows' sample ids and these positions).
        samples: N draws per position.
        proposal_temperature: t of the proposal p^(1/t) / Z_t.
        mode: ensemble mode (``softlabels.targets.topk.ensemble_logprobs``).
    """
    keys = _as_uint64(keys)
    parts, confidence, entropy, agreement = [], [], [], []
    for chunk in ensemble_chunks(member_logits, mode):
        rows = len(chunk.logprobs)
        parts.append(draw_targets(chunk.logprobs, keys[chunk.begin : chunk.begin + rows], samples, proposal_temperature))
        confidence.append(chunk.logprobs.max(dim=-1).values.exp())
        entropy.append(chunk.entropy)
        if chunk.agreement is not None:
            agreement.append(chunk.agreement)
    device = member_logits[0].device
    if parts:
        targets = SampledTargets.concat(parts)
    else:
        targets = draw_targets(torch.empty(0, member_logits[0].shape[-1], device=device), keys, samples, proposal_temperature)
    unique = targets.unique_per_position()
    owner = torch.repeat_interleave(torch.arange(targets.positions, device=unique.device), unique)
    drawn_mass = torch.zeros(targets.positions, dtype=torch.float64, device=unique.device).index_add_(
        0, owner, targets.logprobs.double().exp()).float()

    def joined(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(values) if values else torch.empty(0, device=device)

    return SampledLabels(
        targets=targets,
        confidence=row_mean(joined(confidence), positions_per_row),
        entropy=row_mean(joined(entropy), positions_per_row),
        agreement=row_mean(joined(agreement), positions_per_row) if agreement else None,
        drawn_mass=drawn_mass,
    )


def sample_header_fields(samples: int, proposal_temperature: float) -> dict[str, object]:
    """What a sampled run's shard header (and fingerprinted settings) must record."""
    return {"targets": "sample", "samples": samples, "proposal_temperature": float(proposal_temperature), "sampler": SAMPLER}
