"""Knowledge-distillation losses from stored top-k soft labels (DESIGN.md section 5).

The teacher is stored as k log-probabilities at T=1, normalised over the full vocabulary V, so the
tail mass tau = 1 - sum(exp) of the V - k unstored classes is known. Three ways to use it:

* ``renorm``: drop the tail; the teacher is softmax(logprobs / T) over the k ids. Cheapest, but a
  teacher with 10% tail mass has every stored probability inflated by about 11%.
* ``bucket``: the k ids plus one tail bucket holding the tail at temperature T, as if spread evenly
  over the V - k other ids; the student's bucket is its own tail mass. Costs one logsumexp over V.
* ``uniform``: the dense teacher with the tail spread evenly over the V - k ids, KL over all V.
  Needs a [N, V] teacher block, as much memory as the student's logits.

All three equal Hinton's T^2 * KL(softmax(t/T) || softmax(s/T)) when k = V, which the tests check.

Sampled targets (``targets="sample"``, Random-Sampling KD, Anshumann et al., ACL 2025): per position
the distinct ids drawn N times with replacement from a proposal q (the teacher p, or p^(1/t) / Z_t at
a proposal temperature t), their counts c_i and log p(i) (``softlabels.targets.sampling``). With
w_i = c_i / N, the estimate of the teacher at the loss temperature T is

* T == t (t = 1 included: T = 1 with q = p): p_T = q, so p_hat_i = w_i;
* T == 1 != t: p_hat_i = w_i p(i) / q(i), with q(i) = p(i)^(1/t) / Z_t from the stored log Z_t;
* any other T: w_i p(i)^(1/T) / q(i) normalised to sum 1 (self-normalised importance sampling),
  consistent as N grows but biased for finite N.

The loss per position is sum_i p_hat_i (log p_T(i) - log s_T(i)), log p_T(i) being exact in the
first two cases (log p(i) / t - log Z_t, or log p(i)) and log p(i) / T minus the log of the estimated
normaliser sum_i w_i p(i)^(1/T) / q(i) in the third. In the first two cases it is linear in p_hat,
so both the loss and its gradient T (s_T sum(p_hat) - p_hat) are unbiased for the dense
KL(p_T || s_T) and its gradient T (s_T - p_T): the teacher's entropy is estimated from the same draws
rather than dropped, so the reported figure is comparable to dense KD (it can be slightly negative on
one position, being an estimate of a KL, not a KL).
"""

from __future__ import annotations

import math

import torch

from .options import TAIL_MODES

__all__ = [
    "TAIL_MODES",
    "KD_TARGETS",
    "masked_mean",
    "kd_loss",
    "kd_loss_per_position",
    "sampled_kd_loss_per_position",
    "sampled_estimate_is_unbiased",
    "dense_kd_per_position",
    "dense_kd_loss",
    "hard_label_loss",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100
KD_TARGETS = ("topk", "sample")


def _kl(log_q: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """sum_j q_j (log q_j - log s_j) over the last dim, with 0 log 0 = 0; the teacher carries no gradient."""
    q = log_q.exp()
    safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    return (q * (safe_log_q - log_s)).sum(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` [...] over positions where ``mask`` [...] is True; 0 (finite grads) if none."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _teacher_tail(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log tau, the teacher's mass outside the k stored ids at T=1 (-inf when it rounds to zero)."""
    captured = topk_logprobs.exp().sum(dim=-1)
    return torch.log((1.0 - captured).clamp(min=0.0))


def kd_loss_per_position(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 2.0,
    tail: str = "bucket",
) -> torch.Tensor:
    """KL(teacher_T || student_T) at every position, without the T^2 factor.

    Args:
        student_logits: [..., V] raw student logits.
        topk_ids: [..., k] int64 teacher class ids.
        topk_logprobs: [..., k] teacher log-probabilities at T=1 over the full vocabulary.
        temperature: T > 0.
        tail: ``bucket``, ``renorm`` or ``uniform``.

    Returns:
        [...] per-position KL in nats.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    if k > vocab:
        raise ValueError(f"soft labels have k={k} ids but the student has only {vocab} classes")
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk_ids.long()
    teacher = topk_logprobs.float().detach()
    student_k = student.gather(-1, ids)
    if tail == "renorm" or k == vocab:
        return _kl(torch.log_softmax(teacher / temperature, dim=-1), student_k)
    others = vocab - k
    if tail == "bucket":
        log_tau = _teacher_tail(teacher)
        # each of the V-k tail classes holds tau/(V-k); at T that is (tau/(V-k))^(1/T), V-k times over
        teacher_tail = math.log(others) + (log_tau - math.log(others)) / temperature
        log_q = torch.log_softmax(torch.cat([teacher / temperature, teacher_tail.unsqueeze(-1)], dim=-1), dim=-1)
        student_tail = torch.logsumexp(student.scatter(-1, ids, float("-inf")), dim=-1)
        return _kl(log_q, torch.cat([student_k, student_tail.unsqueeze(-1)], dim=-1))
    log_tau = _teacher_tail(teacher)
    dense = (log_tau - math.log(others)).unsqueeze(-1).expand_as(student).clone()
    dense.scatter_(-1, ids, teacher)
    return _kl(torch.log_softmax(dense / temperature, dim=-1), student)


def sampled_estimate_is_unbiased(temperature: float, proposal_temperature: float) -> bool:
    """Whether the RS-KD estimate is unbiased at ``temperature``: at T=1 and at the proposal's T.

    At any other T the draws are reweighted self-normalised: consistent as N grows, biased for finite N.
    """
    return math.isclose(temperature, 1.0) or math.isclose(temperature, proposal_temperature)


def sampled_kd_loss_per_position(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    sample_logprobs: torch.Tensor,
    temperature: float = 2.0,
    proposal_temperature: float = 1.0,
    proposal_log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The RS-KD estimate of KL(p_T || s_T) at every position, without the T^2 factor.

    Unbiased (loss and gradient) when ``temperature == proposal_temperature`` or
    ``temperature == 1``; self-normalised, consistent but biased for finite N, at other
    temperatures (see the module docstring).

    Args:
        student_logits: [..., V] raw student logits.
        sample_ids: [..., m] int64 distinct drawn ids (any id in slots whose count is 0).
        sample_counts: [..., m] integer draws of each id; 0 marks a padding slot. A position's
            counts sum to N; a position with none gives 0.
        sample_logprobs: [..., m] teacher log p(id) at T=1 over the full vocabulary.
        temperature: T > 0.
        proposal_temperature: t > 0, the temperature the ids were drawn at (q = p^(1/t) / Z_t).
        proposal_log_normalizer: [...] log Z_t = log sum_v p(v)^(1/t); required when t != 1.

    Returns:
        [...] per-position estimate in nats.
    """
    if temperature <= 0 or proposal_temperature <= 0:
        raise ValueError(f"temperatures must be positive, got T={temperature}, proposal t={proposal_temperature}")
    if sample_ids.shape != sample_counts.shape or sample_ids.shape != sample_logprobs.shape:
        raise ValueError(f"sample ids {tuple(sample_ids.shape)}, counts {tuple(sample_counts.shape)} and "
                         f"log-probs {tuple(sample_logprobs.shape)} must have one shape")
    if proposal_temperature != 1.0 and proposal_log_normalizer is None:
        raise ValueError(f"draws at proposal temperature {proposal_temperature} need the proposal's log normaliser")
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, sample_ids.long())
    counts = sample_counts.detach().float()
    drawn = counts > 0
    weights = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0)
    log_p = torch.where(drawn, sample_logprobs.detach().float(), torch.zeros_like(counts))
    log_z = 0.0 if proposal_temperature == 1.0 else proposal_log_normalizer.detach().float().unsqueeze(-1)
    log_q = log_p / proposal_temperature - log_z
    if math.isclose(temperature, proposal_temperature):
        target, log_target = weights, log_q
    elif math.isclose(temperature, 1.0):
        target, log_target = weights * (log_p - log_q).exp(), log_p
    else:
        log_ratio = torch.where(drawn, weights.log() + log_p / temperature - log_q, torch.full_like(counts, float("-inf")))
        log_z_estimate = torch.logsumexp(log_ratio, dim=-1, keepdim=True)
        log_z_estimate = torch.where(drawn.any(dim=-1, keepdim=True), log_z_estimate, torch.zeros_like(log_z_estimate))
        target, log_target = (log_ratio - log_z_estimate).exp(), log_p / temperature - log_z_estimate
    target = torch.where(drawn, target, torch.zeros_like(target))
    return (target * (torch.where(drawn, log_target, torch.zeros_like(log_target)) - student)).sum(dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 2.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
    *,
    targets: str = "topk",
    sample_counts: torch.Tensor | None = None,
    proposal_temperature: float = 1.0,
    proposal_log_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2-scaled KD loss from stored soft labels (top-k or sampled), averaged over valid positions.

    Args:
        student_logits: [..., V], e.g. [B, V] for a classifier or [B, T, V] for sequences.
        topk_ids: [..., k] int64; with ``targets="sample"`` the [..., m] distinct drawn ids.
        topk_logprobs: [..., k] float32 log-probabilities at T=1; with ``targets="sample"`` the
            [..., m] teacher log-probabilities of the drawn ids.
        temperature: T.
        tail: ``bucket`` (default), ``renorm`` or ``uniform``; see the module docstring. Top-k only.
        mask: [...] bool, True at valid positions; None means all positions are valid. A batch
            with no valid position gives 0 with finite (zero) gradients.
        targets: ``topk`` (default) or ``sample`` (the shard header's ``targets``).
        sample_counts: [..., m] draws of each id, 0 in padding slots; ``targets="sample"`` only.
        proposal_temperature: the header's ``proposal_temperature``; ``targets="sample"`` only.
        proposal_log_normalizer: [...] log Z_t per position, needed when the proposal
            temperature is not 1; ``targets="sample"`` only.

    Returns:
        A scalar tensor.
    """
    if targets not in KD_TARGETS:
        raise ValueError(f"targets must be one of {', '.join(KD_TARGETS)}, got {targets!r}")
    if targets == "topk":
        if sample_counts is not None or proposal_log_normalizer is not None or proposal_temperature != 1.0:
            raise ValueError("sample_counts, proposal_temperature and proposal_log_normalizer belong to targets='sample'")
        per_position = kd_loss_per_position(student_logits, topk_ids, topk_logprobs, temperature, tail)
    else:
        if sample_counts is None:
            raise ValueError("targets='sample' needs sample_counts")
        per_position = sampled_kd_loss_per_position(student_logits, topk_ids, sample_counts, topk_logprobs, temperature,
                                                    proposal_temperature, proposal_log_normalizer)
    return masked_mean(per_position, mask) * temperature**2


def dense_kd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) at every position from full teacher logits, [...]; no T^2."""
    teacher = torch.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return _kl(teacher, student)


def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton's T^2 * KL(softmax(t/T) || softmax(s/T)) from full teacher logits (online KD).

    Args:
        student_logits: [..., V].
        teacher_logits: [..., V].
        mask: [...] bool valid positions, or None.
    """
    return masked_mean(dense_kd_per_position(student_logits, teacher_logits, temperature), mask) * temperature**2


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at T=1 over positions whose label is not ``IGNORE_INDEX`` (0 if there are none).

    Args:
        student_logits: [..., V].
        labels: [...] int64, ``IGNORE_INDEX`` where a position has no label.
    """
    flat_logits = student_logits.reshape(-1, student_logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return flat_logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
