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
"""

from __future__ import annotations

import math

import torch

from .options import TAIL_MODES

__all__ = ["TAIL_MODES", "masked_mean", "kd_loss", "kd_loss_per_position", "dense_kd_per_position", "dense_kd_loss", "hard_label_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


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


def kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 2.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2-scaled KD loss from top-k soft labels, averaged over valid positions.

    Args:
        student_logits: [..., V], e.g. [B, V] for a classifier or [B, T, V] for sequences.
        topk_ids: [..., k] int64.
        topk_logprobs: [..., k] float32 log-probabilities at T=1.
        temperature: T.
        tail: ``bucket`` (default), ``renorm`` or ``uniform``; see the module docstring.
        mask: [...] bool, True at valid positions; None means all positions are valid. A batch
            with no valid position gives 0 with finite (zero) gradients.

    Returns:
        A scalar tensor.
    """
    per_position = kd_loss_per_position(student_logits, topk_ids, topk_logprobs, temperature, tail)
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
