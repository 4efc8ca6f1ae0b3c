"""The top-k step as it was before issue 12, kept only so a benchmark can time it beside the current one.

``soft_labels`` here is the pre-issue-12 ``softlabels.targets.topk.soft_labels``: a log-softmax of every
position over the whole vocabulary, a top-k of the log-probabilities, an exp and a batched
[1, C] @ [C, 1] product for the entropy, in chunks of ``CHUNK_ELEMENTS`` floats; and before it,
as ``softlabels.pipeline.process_unit`` did then, one more pass over every teacher's logits for
the NaN/Inf check (``usable_positions``), whose answer it returns as ``SoftLabels.usable``.
``installed`` puts it (and nothing else) in place of the current one inside ``softlabels.pipeline``
so that ``generate`` runs with it; ``bench_llm.py --reference`` alternates the two in one process.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

import softlabels.pipeline as pipeline_module
from softlabels.codec import LogprobCodec
from softlabels.targets.topk import SoftLabels

__all__ = ["CHUNK_ELEMENTS", "soft_labels", "installed", "usable_positions"]

CHUNK_ELEMENTS = 1 << 23


def usable_positions(logits: torch.Tensor) -> torch.Tensor:
    finite_sums = logits.sum(dim=-1).isfinite()
    if bool(finite_sums.all()):
        return finite_sums
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    return ~bad


def ensemble_logprobs(member_logits: list[torch.Tensor], mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    members = [torch.log_softmax(logits.float(), dim=-1) for logits in member_logits]
    if len(members) == 1:
        return members[0], members
    stacked = torch.stack(members)
    if mode == "probs":
        return torch.logsumexp(stacked, dim=0) - math.log(len(members)), members
    if mode == "logprobs":
        return torch.log_softmax(stacked.mean(dim=0), dim=-1), members
    raise ValueError(f"unknown ensemble mode {mode!r}")


def stored_kl(log_p_topk: torch.Tensor, entropy: torch.Tensor, classes: int, codec: LogprobCodec) -> torch.Tensor:
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


def entropy_of(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    entropy = -(p.unsqueeze(-2) @ log_p.unsqueeze(-1)).reshape(p.shape[:-1])
    broken = entropy.isnan()
    if bool(broken.any()):
        entropy[broken] = -torch.special.xlogy(p[broken], p[broken]).sum(dim=-1)
    return entropy


def soft_labels(
    member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, top_k: int, mode: str, codec: LogprobCodec | None = None
) -> SoftLabels:
    """The pre-issue-12 ``softlabels.targets.topk.soft_labels`` (same arguments, same result type)."""
    usable = torch.stack([usable_positions(logits) for logits in member_logits]).all(dim=0)
    codec = codec or LogprobCodec()
    total, classes = member_logits[0].shape
    chunk = max(1, CHUNK_ELEMENTS // max(classes, 1))
    ids, logprobs, top1, entropy, agree, kls = [], [], [], [], [], []
    for begin in range(0, total, chunk):
        pieces = [logits[begin : begin + chunk] for logits in member_logits]
        log_p, members = ensemble_logprobs(pieces, mode)
        values, indices = torch.topk(log_p, top_k, dim=-1, sorted=True)
        ids.append(indices)
        logprobs.append(values)
        top1.append(values[:, 0].exp())
        entropy.append(entropy_of(log_p))
        kls.append(stored_kl(values, entropy[-1], classes, codec))
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
        stored_kl=torch.cat(kls) if kls else torch.empty(0),
        usable=usable,
    )


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Within the block, ``softlabels.pipeline`` computes soft labels with this module's ``soft_labels``."""
    current = pipeline_module.soft_labels
    pipeline_module.soft_labels = soft_labels
    try:
        yield
    finally:
        pipeline_module.soft_labels = current
