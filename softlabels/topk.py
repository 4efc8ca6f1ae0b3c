"""From teacher logits to stored soft labels: ensemble, top-k and per-row statistics, in fp32.

Everything here works on the valid positions of a batch, flattened to [N, C]. The full
distribution is needed once per position (for the ensemble, the normalisation over all C classes and
the entropy), so positions are processed in chunks of at most ``CHUNK_ELEMENTS`` floats per teacher:
at a 256k vocabulary that is 32 positions (32 MB per teacher) at a time instead of a whole batch of
sequences, and memory no longer grows with batch size x sequence length x vocabulary. 32 MB is
glibc's largest recycled allocation: at 64 MB every temporary was a fresh mapping, faulted in and
zeroed by the kernel, which cost about 200 page faults per position at V = 32,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codec import LogprobCodec

__all__ = ["CHUNK_ELEMENTS", "SoftLabels", "ensemble_logprobs", "soft_labels", "valid_positions"]

CHUNK_ELEMENTS = 1 << 23


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
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    agreement: torch.Tensor | None
    captured_mass: torch.Tensor
    stored_kl: torch.Tensor


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


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim: one exp pass and one dot, the cheap way for finite rows.

    A masked class (log p = -inf, p = 0) makes the dot NaN; those rows are redone with 0 log 0 = 0.
    """
    p = log_p.exp()
    # a batched [1, C] @ [C, 1] product: unlike vecdot (mul, then sum) it makes no [n, C] temporary,
    # about 15% of soft_labels' time at C = 49,152
    entropy = -(p.unsqueeze(-2) @ log_p.unsqueeze(-1)).reshape(p.shape[:-1])
    broken = entropy.isnan()
    if bool(broken.any()):
        entropy[broken] = -torch.special.xlogy(p[broken], p[broken]).sum(dim=-1)
    return entropy


def soft_labels(
    member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, top_k: int, mode: str, codec: LogprobCodec | None = None
) -> SoftLabels:
    """Top-k soft labels and row statistics for N valid positions.

    Args:
        member_logits: one [N, C] tensor per teacher (any float dtype; computed in fp32).
        positions_per_row: int64 [B], summing to N.
        top_k: k.
        mode: ensemble mode, see ``ensemble_logprobs``.
        codec: how the shard stores log-probabilities (float16 by default); only the fidelity
            figures depend on it.
    """
    codec = codec or LogprobCodec()
    total, classes = member_logits[0].shape
    chunk = max(1, CHUNK_ELEMENTS // max(classes, 1))
    ids, logprobs, top1, entropy, agree, stored_kl = [], [], [], [], [], []
    for begin in range(0, total, chunk):
        pieces = [logits[begin : begin + chunk] for logits in member_logits]
        log_p, members = ensemble_logprobs(pieces, mode)
        values, indices = torch.topk(log_p, top_k, dim=-1, sorted=True)
        ids.append(indices)
        logprobs.append(values)
        top1.append(values[:, 0].exp())
        entropy.append(_entropy(log_p))
        stored_kl.append(_stored_kl(values, entropy[-1], classes, codec))
        if len(members) > 1:
            best = indices[:, 0]
            votes = torch.stack([m.argmax(dim=-1) == best for m in members]).float().mean(dim=0)
            agree.append(votes)
    all_logprobs = torch.cat(logprobs) if logprobs else torch.empty(0, top_k)
    row_of = torch.repeat_interleave(torch.arange(len(positions_per_row), device=positions_per_row.device), positions_per_row)
    counts = positions_per_row.clamp(min=1).float()

    def row_mean(values: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(values).float()
        return torch.zeros(len(counts), device=flat.device).index_add_(0, row_of.to(flat.device), flat) / counts.to(flat.device)

    return SoftLabels(
        ids=torch.cat(ids),
        logprobs=all_logprobs,
        confidence=row_mean(top1),
        entropy=row_mean(entropy),
        agreement=row_mean(agree) if agree else None,
        captured_mass=all_logprobs.exp().sum(dim=-1),
        stored_kl=torch.cat(stored_kl) if stored_kl else torch.empty(0),
    )
