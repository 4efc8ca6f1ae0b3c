"""Evaluating a student on a soft-label directory: ``train-student --eval`` and ``--eval-every``."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..data import SoftLabelDataset
from ..losses import IGNORE_INDEX
from ..options import TrainConfig
from .objective import hard_labels, stored_kd_per_position, student_logits, teacher_top1

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: SoftLabelDataset, config: TrainConfig, device: torch.device, next_token: bool,
             precision: AbstractContextManager[Any]) -> dict[str, float]:
    """KD loss, top-1 agreement with the teacher, and accuracy / CE against hard labels when present.

    The student's forward runs inside ``precision`` (``distributed.autocast(device, config.precision)``,
    the recipe's one context); the losses outside it, in fp32.

    On sampled targets ``eval_kd`` is the RS-KD estimate and the teacher's top-1 is the most probable
    drawn id (``teacher_top1``).
    """
    was_training = model.training
    model.eval()
    kd_sum = agree = positions = correct = labelled = 0.0
    ce_sum = 0.0
    dataset.set_epoch(0)
    for batch in dataset:
        with precision:
            logits = student_logits(model, batch, device)
        logits = logits.float()
        mask = batch["mask"].to(device)
        per_position = stored_kd_per_position(logits, batch, config.temperature, config.tail)
        kd_sum += float((per_position * mask).sum())
        prediction = logits.argmax(dim=-1)
        agree += float(((prediction == teacher_top1(batch).to(device)) & mask).sum())
        positions += float(mask.sum())
        labels = hard_labels(batch, next_token, logits.shape[1])
        if labels is not None:
            labels = labels.to(device).masked_fill(~mask, IGNORE_INDEX)
            has = labels != IGNORE_INDEX
            correct += float(((prediction == labels) & has).sum())
            labelled += float(has.sum())
            ce_sum += float(torch.nn.functional.cross_entropy(logits[has], labels[has], reduction="sum")) if bool(has.any()) else 0.0
    model.train(was_training)
    metrics = {"eval_kd": kd_sum / max(positions, 1) * config.temperature**2, "eval_top1_agreement": agree / max(positions, 1)}
    if labelled:
        metrics["eval_accuracy"] = correct / labelled
        metrics["eval_ce"] = ce_sum / labelled
        metrics["eval_perplexity"] = math.exp(min(ce_sum / labelled, 50.0))
    return metrics
