"""Train with Hugging Face ``transformers.Trainer`` from soft-label shards (extra ``[hf]``).

Three parts; PEFT/LoRA, FSDP, DeepSpeed, gradient accumulation and the Trainer's schedulers and
callbacks then come from transformers:

* ``load_soft_label_dataset(DIR)``: verify the sealed directory, then open the shards its manifest
  lists as an HF ``datasets.Dataset`` (one row per shard row).
* ``SoftLabelCollator.from_directory(DIR)``: rows -> ``input_ids`` [B, T] int64 and
  ``attention_mask`` [B, T] for the model, plus the targets under names the model never sees
  (``SOFT_LABEL_KEYS``): ``topk_ids`` [B, T, k] int64, ``topk_logprobs`` [B, T, k] float32 (or
  sampled targets: ``sample_ids``, ``sample_counts``, ``sample_logprobs`` and the proposal's fields),
  ``target_mask`` [B, T] bool (positions with targets; for chat shards only the assistant's) and
  ``hard_labels`` [B, T] int64 (the next token, or the label column; ``IGNORE_INDEX`` where none).
* ``SoftLabelTrainer(..., temperature=, alpha=, tail=)``: a ``Trainer`` whose ``compute_loss`` is
  ``soft_label_loss``, the objective of ``train-student`` (``softlabels.train.objective``):
  ``alpha * T^2 KL + (1 - alpha) * CE``, each a mean over this batch's target positions. Student
  logits at position t meet the stored targets of position t; the hard label of t is token t + 1.
  ``evaluate()`` adds ``eval_kd`` (per-position mean, T^2-scaled), ``eval_ce`` and
  ``eval_top1_agreement``, defined as ``train-student --eval`` defines them.

Why a subclass and not ``Trainer(compute_loss_func=...)``: that hook sees only the model outputs
and ``inputs["labels"]``, so the soft labels would have to ride in ``labels`` as a dict where the
Trainer's token counting expects a tensor; and the Trainer takes the hook's result as already
normalised over the whole accumulated batch, so a per-batch mean would not be divided by the
gradient accumulation steps. ``SoftLabelTrainer`` returns a per-batch mean and says so
(``loss_is_scaled_for_ga = False``): micro-batch means are averaged, as ``train-student`` averages
over DDP ranks.

This module imports transformers (``import softlabels`` does not). The Trainer needs
``TrainingArguments(remove_unused_columns=False)``: otherwise it drops the shard columns the
model's ``forward`` does not name before the collator sees them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .codec import LogprobCodec
from .data import collate
from .errors import NotSealedError, UserError
from .losses import IGNORE_INDEX
from .targets import all_batch_keys, kind_of, registered
from .options import TAIL_MODES
from .rundir import RunDirectory
from .train.objective import hard_labels, is_token_sequence, soft_label_loss
from .verify import verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as softlabels.hf: no retries against an unreachable hub
try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - the [hf] extra is missing
    raise ImportError("softlabels.hf_trainer needs transformers: pip install -e '.[hf]'") from exc

__all__ = ["SOFT_LABEL_KEYS", "soft_label_keys", "SoftLabelCollator", "SoftLabelTrainer", "load_soft_label_dataset", "soft_label_loss"]

def soft_label_keys() -> tuple[str, ...]:
    """Batch keys that carry targets (every registered target kind's, the mask and the hard labels);
    ``SoftLabelTrainer`` removes them before calling the model."""
    return (*all_batch_keys(), "target_mask", "hard_labels")


SOFT_LABEL_KEYS = soft_label_keys()
"""``soft_label_keys()`` of the built-in target kinds."""


def _sealed_manifest(directory: str | os.PathLike[str], verify_shards: bool | None = None) -> dict[str, Any]:
    """The manifest of a sealed top-k or sampled directory; ``verify_shards`` True/False runs the full/quick verify first."""
    try:
        if verify_shards is not None:
            verify(directory, quick=not verify_shards)
        manifest = RunDirectory.open(directory).read_sealed()
    except NotSealedError as exc:  # as train-student: an unsealed directory is the user's to finish
        raise UserError(f"{directory}: {exc}") from None
    try:
        kind_of(manifest)
    except UserError:
        raise UserError(f"{directory}: holds {manifest.get('targets')!r} targets, a kind this process does not know") from None
    return manifest


def load_soft_label_dataset(directory: str | os.PathLike[str], verify_sha256: bool = True,
                            cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Verify a sealed soft-label directory and open its shards as an HF ``datasets.Dataset``.

    Args:
        directory: a local directory written by ``softlabels generate`` (or ``select``).
        verify_sha256: hash every shard against the manifest first (as ``train-student`` does);
            False checks sizes and footers only (``softlabels verify --quick``).
        cache_dir: the ``datasets`` cache (its Arrow copy of the shards); default ``datasets``'.

    Returns:
        A ``datasets.Dataset`` of the shards listed in the manifest, in manifest order; columns as
        in the shards (``sample_id``, the input column, ``topk_ids``, the log-prob column, ...).

    Raises:
        UserError: not a sealed local directory, or no rows.
        VerificationError: a damaged shard, naming the file.
    """
    run_directory = RunDirectory.open(directory)
    if not run_directory.root.local:
        raise UserError(f"{directory}: load_soft_label_dataset reads local directories; for a store URI use "
                        "datasets.load_dataset('parquet', data_files=..., storage_options=...) and SoftLabelCollator")
    manifest = _sealed_manifest(directory, verify_shards=verify_sha256)
    files = [str(run_directory.shard_path(entry["file"]).local_path) for entry in manifest["shards"] if entry["rows"]]
    if not files:
        raise UserError(f"{directory}: holds no rows to train on")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UserError("load_soft_label_dataset needs the datasets package: pip install 'datasets>=3.0'") from None
    return datasets.load_dataset("parquet", data_files=files, split="train",
                                 cache_dir=None if cache_dir is None else str(cache_dir))


class SoftLabelCollator:
    """HF ``datasets`` rows of shard rows -> a batch for ``SoftLabelTrainer``.

    The rows have lost the shard header, so the input column, label column and log-prob codec
    come from the manifest. Returns ``input_ids`` int64 [B, T] (padding 0), ``attention_mask``
    int64 [B, T] (1 on each row's tokens), ``topk_ids`` int64 [B, T, k], ``topk_logprobs`` float32
    [B, T, k] (sampled shards: ``sample_ids``, ``sample_counts``, ``sample_logprobs`` [B, T, m],
    ``sample_log_normalizer`` [B, T] when the proposal temperature is not 1, and
    ``proposal_temperature``, as ``collate`` gives them), ``target_mask`` bool [B, T] (collate's
    ``mask``: the positions that have targets) and
    ``hard_labels`` int64 [B, T] (``IGNORE_INDEX`` where none), built by ``softlabels.train.objective.hard_labels``
    as ``train-student`` builds them: the label column when there is one, else the next token.
    """

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.input_column: str | None = manifest.get("input_column")
        self.label_column: str | None = manifest.get("label_column")
        self.codec = LogprobCodec.from_header(manifest)
        self.vocab_size = int(manifest["vocab_size"])
        self.kind = kind_of(manifest)
        self.header = manifest
        stored_temperature = manifest.get("proposal_temperature")  # sampled targets' proposal, for rows without their header
        self.proposal_temperature = None if stored_temperature is None else float(stored_temperature)
        if self.input_column is None:
            raise UserError("these shards have no input column; the HF Trainer path feeds token ids to the model")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> SoftLabelCollator:
        """The collator of a sealed directory (reads its manifest)."""
        return cls(_sealed_manifest(directory))

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(rows, input_column=self.input_column, label_column=self.label_column, codec=self.codec,
                        proposal_temperature=self.proposal_temperature)
        tokens = batch["inputs"]
        if tokens.dim() != 2 or torch.is_floating_point(tokens):
            raise UserError(f"column {self.input_column!r} holds {tuple(tokens.shape[1:])} {tokens.dtype} values per row, "
                            "not token ids; train such students with train-student")
        if "lengths" in batch:
            attention = (torch.arange(tokens.shape[1])[None, :] < batch["lengths"][:, None]).long()
        else:
            attention = torch.ones_like(tokens)
        steps = batch["mask"].shape[1]
        labels = hard_labels(batch, is_token_sequence(batch), steps)  # train-student's labels
        if labels is None:
            labels = torch.full((tokens.shape[0], steps), IGNORE_INDEX, dtype=torch.int64)
        targets = {key: batch[key] for key in soft_label_keys() if key in batch}
        return {"input_ids": tokens.long(), "attention_mask": attention, **targets, "target_mask": batch["mask"], "hard_labels": labels}


class SoftLabelTrainer(Trainer):
    """A ``transformers.Trainer`` that distils from soft labels (see the module docstring).

    Takes the Trainer's arguments plus ``temperature`` (2.0), ``alpha`` (0.5) and ``tail``
    (``bucket``), the defaults of ``train-student``. Use ``SoftLabelCollator`` as the
    ``data_collator`` and ``TrainingArguments(remove_unused_columns=False)``. Training logs add
    ``kd`` and ``ce`` (this process's batch means since the last log); ``evaluate()`` adds
    ``eval_kd``, ``eval_ce`` and ``eval_top1_agreement`` (per-position means over the set).
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args: Any, temperature: float = 2.0, alpha: float = 0.5, tail: str = "bucket", **kwargs: Any) -> None:
        if not temperature > 0:
            raise UserError(f"SoftLabelTrainer temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"SoftLabelTrainer alpha must be in [0, 1], got {alpha}")
        if tail not in TAIL_MODES:
            raise UserError(f"SoftLabelTrainer tail must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise UserError("SoftLabelTrainer needs TrainingArguments(remove_unused_columns=False): "
                            "otherwise the Trainer drops the soft-label columns before the collator")
        self.temperature, self.alpha, self.tail = temperature, alpha, tail
        collator = self.data_collator
        bias = collator.kind.bias_warning(temperature, collator.header) if isinstance(collator, SoftLabelCollator) else None
        if bias is not None:
            warnings.warn(f"temperature {bias}: their KD estimate is then consistent, not unbiased", stacklevel=2)
        if self.args.label_names is None:
            self.label_names = ["target_mask"]  # so evaluate() computes a loss (top-k and sampled batches have it)
        self._train_sums: torch.Tensor | None = None  # kd, ce, batches; on the model's device: no sync per step
        self._eval_sums: torch.Tensor | None = None  # kd * positions, ce * labelled, positions, labelled, agree
        self._vocab_checked = False

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """``soft_label_loss`` of the batch; the model sees every key but ``SOFT_LABEL_KEYS``."""
        keys = soft_label_keys()
        targets = {key: inputs[key] for key in keys if key in inputs}
        if not any(kind.batch_key in targets for kind in registered()) or "target_mask" not in targets:
            raise UserError("SoftLabelTrainer batches need topk_ids (or sample_ids), their log-probabilities and target_mask: "
                            "use SoftLabelCollator as data_collator")
        model_inputs = {key: value for key, value in inputs.items() if key not in keys}
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if not self._vocab_checked and isinstance(self.data_collator, SoftLabelCollator):
            if logits.shape[-1] != self.data_collator.vocab_size:
                raise UserError(f"the model has {logits.shape[-1]} output classes but the soft labels' teachers "
                                f"have {self.data_collator.vocab_size}")
            self._vocab_checked = True
        terms = soft_label_loss(logits, targets, self.temperature, self.alpha, self.tail)
        with torch.no_grad():
            kd, ce = terms["kd"].detach(), terms["ce"].detach()
            dtype = torch.float32 if kd.device.type == "mps" else torch.float64
            if model.training:
                step = torch.stack([kd, ce, torch.ones_like(kd)]).to(dtype)
                self._train_sums = step if self._train_sums is None else self._train_sums + step
            else:
                positions, labelled = terms["positions"].to(dtype), terms["labelled"].to(dtype)
                step = torch.stack([kd.to(dtype) * positions, ce.to(dtype) * labelled, positions, labelled, terms["agree"].to(dtype)])
                self._eval_sums = step if self._eval_sums is None else self._eval_sums + step
        return (terms["loss"], outputs) if return_outputs else terms["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._train_sums is not None:
            kd, ce, batches = self._train_sums.tolist()
            logs = {**logs, "kd": kd / batches, "ce": ce / batches}
            self._train_sums = None
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._eval_sums = None
        output = super().evaluation_loop(*args, **kwargs)
        if self._eval_sums is None:  # an empty evaluation set
            return output
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        kd_sum, ce_sum, positions, labelled, agree = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
        if positions:
            output.metrics[f"{prefix}_kd"] = kd_sum / positions
            output.metrics[f"{prefix}_top1_agreement"] = agree / positions
        if labelled:
            output.metrics[f"{prefix}_ce"] = ce_sum / labelled
        return output
