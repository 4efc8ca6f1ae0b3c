"""The distillation objective on one batch, shared by ``train-student`` and the HF Trainer.

``alpha * T^2 KL + (1 - alpha) * CE``, each a mean over the batch's target positions: KL against
the batch's stored targets (top-k with ``--tail``, or the RS-KD estimate of sampled targets, as
the batch's target kind says) or, online, the teacher's logits; CE against the hard labels (the
label column, or for token sequences the next token). ``batch_losses`` takes a collated batch
(``mask``), ``soft_label_loss`` a ``SoftLabelCollator`` batch (``target_mask``, ``hard_labels``);
both end in ``objective_terms``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..inputs import TeacherInputs
from ..losses import IGNORE_INDEX, dense_kd_per_position, hard_label_loss
from ..options import TrainConfig
from ..targets import kind_of_batch

__all__ = ["batch_losses", "hard_labels", "is_token_sequence", "objective_terms", "soft_label_loss", "stored_kd_per_position",
           "student_logits", "teacher_top1"]


def student_logits(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Call the student by the teacher convention; logits [B, T, V] aligned with the soft labels."""
    inputs = TeacherInputs(batch["inputs"].to(device), batch["lengths"].to(device) if "lengths" in batch else None)
    output = model(inputs.x) if inputs.lengths is None else model(inputs.x, inputs.lengths)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 2:
        output = output.unsqueeze(1)
    steps = batch["mask"].shape[1]
    if output.shape[1] < steps:
        raise UserError(f"--student returns {output.shape[1]} positions but the soft labels have {steps}")
    return output[:, :steps]


def hard_labels(batch: dict[str, Any], next_token: bool, steps: int) -> torch.Tensor | None:
    """Hard labels [B, T] aligned with the positions, or None when the data has none."""
    if "labels" in batch:
        labels = batch["labels"]
        if labels.dim() == 1:
            padded = torch.full((labels.shape[0], steps), IGNORE_INDEX, dtype=torch.int64)
            padded[:, 0] = labels
            return padded
        return labels[:, :steps]
    if next_token:
        tokens = batch["inputs"]
        labels = torch.full(tokens.shape[:2], IGNORE_INDEX, dtype=torch.int64)
        labels[:, :-1] = tokens[:, 1:]
        if "lengths" in batch:
            last = (batch["lengths"] - 1).clamp(min=0)
            labels[torch.arange(len(labels)), last] = IGNORE_INDEX  # the last token has no successor
        return labels[:, :steps]
    return None


def stored_kd_per_position(logits: torch.Tensor, batch: dict[str, Any], temperature: float, tail: str,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher_T || student_T) at each position against the batch's stored targets, without T^2.

    Top-k batches use ``kd_loss_per_position`` with ``--tail``; sampled batches (``sample_ids``) the
    RS-KD estimate ``sampled_kd_loss_per_position`` at the batch's ``proposal_temperature``.

    Args:
        logits: [M, V] student logits at the positions ``mask`` selects, or [B, T, V] when mask is None.
        mask: bool [B, T] selecting the targets' positions, or None to take every position.

    Returns:
        [M] or [B, T] per-position values in nats.
    """
    device = logits.device

    def pick(name: str) -> torch.Tensor:
        value = batch[name].to(device)
        return value if mask is None else value[mask]

    return kind_of_batch(batch).loss_per_position(logits, pick, batch, temperature, tail)


def teacher_top1(batch: dict[str, Any]) -> torch.Tensor:
    """int64 [B, T] the teacher's most probable stored class per position: top-k's first id, or the
    drawn id of largest teacher log-probability (0 at positions without targets)."""
    return kind_of_batch(batch).teacher_top1(batch)


def batch_losses(logits: torch.Tensor, batch: dict[str, Any], config: TrainConfig, next_token: bool,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: ``loss`` (to minimise), ``kd``, ``ce`` and counts.

    Only valid positions are gathered before the losses, so padding costs no [., V] work: with
    ragged sequences of 32-128 tokens that is about a third of the vocabulary-sized arithmetic.
    With ``teacher_logits`` [B, T, V] (online distillation) KD uses the full teacher distribution
    instead of the stored targets; otherwise top-k or sampled targets, as the batch holds
    (``stored_kd_per_position``).
    """
    device = logits.device
    mask = batch["mask"].to(device)
    valid_logits = logits[mask]
    if teacher_logits is not None:
        per_position = dense_kd_per_position(valid_logits, teacher_logits[mask], config.temperature)
    else:
        per_position = stored_kd_per_position(valid_logits, batch, config.temperature, config.tail, mask)
    labels = hard_labels(batch, next_token, logits.shape[1])
    valid_labels = None if labels is None else labels.to(device)[mask]
    return objective_terms(valid_logits, per_position, valid_labels, mask.sum(), config.temperature, config.alpha)


def objective_terms(valid_logits: torch.Tensor, per_position: torch.Tensor, valid_labels: torch.Tensor | None,
                    positions: torch.Tensor, temperature: float, alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * kd + (1 - alpha) * ce`` from the target positions' values.

    Args:
        valid_logits: [N, V] student logits at the N target positions.
        per_position: [N] KL(teacher_T || student_T) at those positions, without T^2.
        valid_labels: [N] int64 hard labels (``IGNORE_INDEX`` where none), or None without labels.
        positions: int64 scalar N (the mask's sum), on the logits' device.

    Returns:
        ``loss``, ``kd`` (T^2-scaled mean over the positions), ``ce`` (mean over the labelled
        positions; 0 without any), ``positions`` and ``labelled`` (counts).
    """
    kd = per_position.sum() / positions.clamp(min=1) * temperature**2
    if valid_labels is not None:
        ce = hard_label_loss(valid_logits, valid_labels)
        labelled = (valid_labels != IGNORE_INDEX).sum()
    else:
        ce = valid_logits.sum() * 0.0
        labelled = torch.zeros((), dtype=torch.int64, device=valid_logits.device)
    loss = alpha * kd + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd, "ce": ce, "positions": positions, "labelled": labelled}


def soft_label_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float = 2.0,
                    alpha: float = 0.5, tail: str = "bucket") -> dict[str, torch.Tensor]:
    """``train-student``'s objective on one ``SoftLabelCollator`` batch: ``alpha * kd + (1 - alpha) * ce``.

    Args:
        logits: student logits [B, T', V] with T' >= T (a causal LM), or [B, V] (one position).
        batch: ``topk_ids`` [B, T, k] and ``topk_logprobs`` [B, T, k], or sampled targets
            (``sample_ids``, ``sample_counts``, ``sample_logprobs`` [B, T, m], ``proposal_temperature``,
            optionally ``sample_log_normalizer`` [B, T]); ``target_mask`` bool [B, T]; optionally
            ``hard_labels`` [B, T] (``IGNORE_INDEX`` where none).
        temperature, alpha, tail: as ``train-student --temperature --alpha --tail``.

    Returns:
        ``loss``, ``kd`` (``kd_loss`` over the target positions, T^2-scaled; for sampled targets the
        RS-KD estimate, and ``tail`` is unused), ``ce`` (hard-label
        CE over the labelled target positions; 0 if none), and the counts ``positions``,
        ``labelled`` and ``agree`` (target positions whose student argmax is the teacher's top-1).
    """
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    steps = batch["target_mask"].shape[1]
    if logits.shape[1] < steps:
        raise UserError(f"the model returns {logits.shape[1]} positions but the soft labels have {steps}")
    mask = batch["target_mask"].to(logits.device)
    valid_logits = logits[:, :steps][mask].float()  # [N, V]: padding and non-target positions cost no fp32 copy or work
    per_position = stored_kd_per_position(valid_logits, batch, temperature, tail, mask)
    labels = batch.get("hard_labels")
    valid_labels = None if labels is None else labels.to(logits.device)[mask]
    terms = objective_terms(valid_logits, per_position, valid_labels, mask.sum(), temperature, alpha)
    terms["agree"] = (valid_logits.argmax(dim=-1) == teacher_top1(batch).to(logits.device)[mask]).sum()
    return terms


def is_token_sequence(batch: dict[str, Any]) -> bool:
    """Token sequences without a label column: the hard label of position j is token j + 1."""
    inputs = batch["inputs"]
    return "labels" not in batch and inputs.dim() == 2 and not torch.is_floating_point(inputs) and batch["mask"].shape[1] > 1
