"""``--targets sample``: per position N draws from the teacher (or a proposal at another temperature),
stored as the distinct drawn ids with their counts and log-probabilities; the RS-KD loss.

The draws themselves (keys, sampler, Arrow conversions) are ``softlabels.targets.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..codec import CODES_COLUMN, LOGPROB_COLUMN, LogprobCodec
from ..errors import UserError
from ..fidelity import Fidelity
from ..losses import sampled_estimate_is_unbiased, sampled_kd_loss_per_position
from ..schema import (PROPOSAL_TEMPERATURE_KEY, SAMPLE_CODES_COLUMN, SAMPLE_COUNTS_COLUMN, SAMPLE_IDS_COLUMN, SAMPLE_LOGPROBS_COLUMN,
                      SAMPLE_NORMALIZER_COLUMN, id_type, sample_count_type, sample_fields, sample_logprob_column)
from .base import HostTargets, distribution, register
from .rows import SampledRows
from .sampling import SampledTargets, position_keys, sample_header_fields, sampled_labels
from .topk import usable_positions

__all__ = ["SAMPLED", "Sampled", "SampledBatch", "sample_arrays", "targets_from_arrow"]


@dataclass
class SampledBatch:
    """A batch's valid positions before the draws: the members' [N, C] logits (draws need the rows' sample ids)."""

    member_logits: list[torch.Tensor]
    usable: torch.Tensor
    run: Any

    def of_rows(self, keep: torch.Tensor, positions_per_row: torch.Tensor) -> "SampledBatch":
        row_of = torch.repeat_interleave(torch.arange(len(positions_per_row), device=keep.device), positions_per_row.to(keep.device))
        kept = keep[row_of]
        return SampledBatch([flat[kept] for flat in self.member_logits], self.usable[kept], self.run)

    def to_host(self, sample_ids: Sequence[str], positions_per_row: torch.Tensor, fidelity: Fidelity) -> HostTargets:
        """The draws, keyed by (run fingerprint, sample id, index among the row's stored positions), so they
        do not depend on the batch a row falls in."""
        config = self.run.config
        keys = position_keys(self.run.fingerprint, list(sample_ids), positions_per_row)
        drawn = sampled_labels(self.member_logits, positions_per_row, keys, config.samples, config.proposal_temperature, config.ensemble)
        targets = drawn.targets
        data = SampledTargets(targets.ids.cpu(), targets.counts.cpu(), targets.logprobs.cpu(), targets.offsets.cpu(),
                              targets.log_normalizer.cpu(), targets.samples, targets.proposal_temperature)
        host = HostTargets(data, drawn.confidence.cpu().numpy(), drawn.entropy.cpu().numpy(),
                           None if drawn.agreement is None else drawn.agreement.cpu().numpy())
        fidelity.add_sampled(drawn.drawn_mass.cpu().numpy(), targets.unique_per_position().cpu().numpy())
        return host


class Sampled:
    """Random-Sampling KD targets (Anshumann et al., ACL 2025); see the module docstring."""

    name = "sample"
    manifest_keys = ("samples", "proposal_temperature")
    size_key = "samples"
    batch_keys = ("sample_ids", "sample_counts", "sample_logprobs", "sample_log_normalizer", "proposal_temperature")
    batch_key = "sample_ids"
    id_column = SAMPLE_IDS_COLUMN
    soft_column_names = (SAMPLE_IDS_COLUMN, SAMPLE_COUNTS_COLUMN, SAMPLE_LOGPROBS_COLUMN, SAMPLE_CODES_COLUMN, SAMPLE_NORMALIZER_COLUMN)
    inspect_figures = ("unique_ids", "drawn_mass")
    logprob_column_names = (SAMPLE_LOGPROBS_COLUMN, SAMPLE_CODES_COLUMN)

    def prepare(self, config: Any, vocab_size: int) -> None:
        """No k: every class can be drawn."""

    def settings(self, config: Any) -> dict[str, Any]:
        return {"top_k": None, **sample_header_fields(config.samples, config.proposal_temperature)}

    def header(self, config: Any) -> dict[str, Any]:
        return sample_header_fields(config.samples, config.proposal_temperature)

    def fields(self, vocab_size: int, header: dict[str, Any], codec: LogprobCodec) -> list[pa.Field]:
        return sample_fields(vocab_size, int(header["samples"]), float(header["proposal_temperature"]), codec)

    def columns(self, header: dict[str, Any], codec: LogprobCodec) -> tuple[str, str]:
        return SAMPLE_IDS_COLUMN, sample_logprob_column(codec)

    def compute(self, member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, run: Any) -> SampledBatch:
        usable = torch.stack([usable_positions(flat) for flat in member_logits]).all(dim=0)
        return SampledBatch(member_logits, usable, run)

    def join(self, parts: list[Any], header: dict[str, Any]) -> Any:
        if parts:
            return SampledTargets.concat(parts)
        return SampledTargets(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0), torch.zeros(1, dtype=torch.int64),
                              torch.empty(0), int(header["samples"]), float(header["proposal_temperature"]))

    def arrays(self, data: Any, positions: np.ndarray, vocab_size: int, codec: LogprobCodec, header: dict[str, Any]) -> list[pa.Array]:
        return sample_arrays(data, positions, vocab_size, codec)

    def fidelity_summary(self, fidelity: Fidelity) -> dict[str, float]:
        """Drawn mass (the teacher probability of the distinct drawn ids) and distinct ids per position."""
        count = max(fidelity.positions, 1)
        return {"positions": fidelity.positions, "drawn_mass_mean": fidelity.mass_sum / count,
                "drawn_mass_p5": fidelity.percentile_mass(0.05), "unique_ids_mean": fidelity.unique_sum / count}

    def describe_fidelity(self, soft_per_position: float, fidelity: dict[str, float]) -> str:
        return (f"({soft_per_position:.1f} for sampled ids, counts and log-probs); "
                f"distinct ids per position mean {fidelity['unique_ids_mean']:.2f}, "
                f"their teacher mass mean {fidelity['drawn_mass_mean']:.4f}, p5 {fidelity['drawn_mass_p5']:.3f}")

    def read_columns(self, header: dict[str, Any], codec: LogprobCodec) -> list[str]:
        columns = [SAMPLE_IDS_COLUMN, SAMPLE_COUNTS_COLUMN, sample_logprob_column(codec)]
        return columns + ([SAMPLE_NORMALIZER_COLUMN] if float(header.get("proposal_temperature", 1.0)) != 1.0 else [])

    def codec_without_header(self, schema: pa.Schema) -> LogprobCodec:
        """From the log-prob field's own metadata and type."""
        for sampled_name, topk_name in ((SAMPLE_CODES_COLUMN, CODES_COLUMN), (SAMPLE_LOGPROBS_COLUMN, LOGPROB_COLUMN)):
            if schema.get_field_index(sampled_name) >= 0:
                return LogprobCodec.from_columns(pa.schema([schema.field(sampled_name).with_name(topk_name)]))
        raise UserError(f"no {SAMPLE_LOGPROBS_COLUMN!r} or {SAMPLE_CODES_COLUMN!r} column in these sampled shard rows")

    def row_options(self, schema: pa.Schema, header: dict[str, Any] | None) -> dict[str, Any]:
        """The proposal temperature: the header's, else the log normaliser field's (1 without that column)."""
        if header is not None:
            return {"proposal_temperature": float(header.get("proposal_temperature", 1.0))}
        if schema.get_field_index(SAMPLE_NORMALIZER_COLUMN) < 0:
            return {"proposal_temperature": 1.0}  # the normaliser is stored exactly when the proposal is not the teacher itself
        metadata = schema.field(SAMPLE_NORMALIZER_COLUMN).metadata or {}
        if PROPOSAL_TEMPERATURE_KEY not in metadata:
            raise UserError(f"column {SAMPLE_NORMALIZER_COLUMN!r} is there but the proposal temperature is gone with the shard header; "
                            "pass rows that keep their schema metadata")
        return {"proposal_temperature": float(metadata[PROPOSAL_TEMPERATURE_KEY])}

    def rows(self, table: pa.Table, codec: LogprobCodec, options: dict[str, Any], place: Callable[[np.ndarray], Any]) -> SampledRows:
        return SampledRows(table, codec, float(options.get("proposal_temperature", 1.0)), place)

    def loss_per_position(self, logits: torch.Tensor, pick: Callable[[str], torch.Tensor], batch: dict[str, Any],
                          temperature: float, tail: str) -> torch.Tensor:
        normalizer = pick("sample_log_normalizer") if "sample_log_normalizer" in batch else None
        return sampled_kd_loss_per_position(logits, pick("sample_ids"), pick("sample_counts"), pick("sample_logprobs"),
                                            temperature, float(batch["proposal_temperature"]), normalizer)

    def teacher_top1(self, batch: dict[str, Any]) -> torch.Tensor:
        """The drawn id of largest teacher log-probability (0 at positions without targets)."""
        ids, counts = batch["sample_ids"], batch["sample_counts"]
        if ids.shape[-1] == 0:
            return torch.zeros(ids.shape[:-1], dtype=torch.int64)
        scores = batch["sample_logprobs"].masked_fill(counts == 0, float("-inf"))
        return ids.gather(-1, scores.argmax(dim=-1, keepdim=True)).squeeze(-1)

    def bias_warning(self, temperature: float, header: dict[str, Any]) -> str | None:
        """Why the RS-KD estimate at ``temperature`` is biased: it is unbiased at 1 and at the proposal temperature."""
        proposal = float(header.get("proposal_temperature", 1.0))
        if sampled_estimate_is_unbiased(temperature, proposal):
            return None
        return f"{temperature:g} is neither 1 nor the proposal temperature {proposal:g} of the sampled targets"

    def inspect(self, scan: Any, manifest: dict[str, Any], codec: LogprobCodec) -> tuple[dict[str, Any], Any]:
        import polars as pl

        ids_column, logprob_column = self.columns(manifest, codec)
        positions = scan.select(
            pl.col(logprob_column).explode().list.eval(codec.decode_polars(pl.element()).exp()).list.sum().alias("mass"),
            pl.col(ids_column).explode().list.len().alias("unique"),
            pl.col(ids_column).explode().list.first().alias("top1"),
        ).collect()
        return {"drawn_mass": distribution(positions, "mass", upper=1.0),
                "unique_ids": distribution(positions, "unique", upper=float(manifest["samples"]))}, positions

    def inspect_lines(self, report: dict[str, Any]) -> tuple[str, list[str], str]:
        fidelity = report.get("fidelity") or {}
        lines = []
        if "unique_ids_mean" in fidelity:
            lines.append(f"whole run: {fidelity['unique_ids_mean']:.2f} distinct ids per position holding {fidelity['drawn_mass_mean']:.4f} "
                         "of the teacher's mass (the draws estimate the rest without bias)")
        stored = f"{report['samples']} draws (proposal temperature {report['proposal_temperature']:g})"
        return stored, lines, "classes most often the most drawn id of a position"

    def report_fields(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"samples": manifest["samples"], "proposal_temperature": manifest["proposal_temperature"]}


def _offsets(lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def sample_arrays(targets: SampledTargets, positions_per_row: torch.Tensor | np.ndarray, vocab_size: int,
                  codec: LogprobCodec | None = None) -> list[pa.Array]:
    """Arrow arrays matching ``sample_fields``: one list entry per row, one inner list per position.

    Args:
        targets: the sampled targets of the N positions of B rows, rows in order.
        positions_per_row: int [B], summing to N.
        vocab_size: V (ids are uint16 when V <= 65,536).
        codec: how log-probabilities are stored (the run's ``--logprob-dtype``).
    """
    codec = codec or LogprobCodec()
    rows = np.asarray(torch.as_tensor(positions_per_row).cpu(), dtype=np.int64)
    if int(rows.sum()) != targets.positions:
        raise ValueError(f"positions_per_row sums to {int(rows.sum())} but there are {targets.positions} positions")
    row_offsets = _offsets(rows)
    inner = pa.array(targets.offsets.cpu().numpy().astype(np.int32))

    def nested(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(row_offsets, pa.ListArray.from_arrays(inner, pa.array(values, type=value_type)))

    arrays = [
        nested(targets.ids.cpu().numpy().astype(id_type(vocab_size).to_pandas_dtype()), id_type(vocab_size)),
        nested(targets.counts.cpu().numpy().astype(sample_count_type(targets.samples).to_pandas_dtype()), sample_count_type(targets.samples)),
        nested(codec.encode_numpy(targets.logprobs.cpu().numpy()), codec.arrow_type),
    ]
    if targets.proposal_temperature != 1.0:
        arrays.append(pa.ListArray.from_arrays(row_offsets, pa.array(targets.log_normalizer.cpu().numpy().astype(np.float32))))
    return arrays


def targets_from_arrow(table: pa.Table, samples: int, proposal_temperature: float, codec: LogprobCodec | None = None) -> SampledTargets:
    """All positions of a table's rows (rows in order) back as ``SampledTargets``, log-probs decoded."""
    codec = codec or LogprobCodec()

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        per_position = table.column(name).combine_chunks().flatten()
        return per_position.flatten().to_numpy(zero_copy_only=False), np.asarray(per_position.offsets.to_numpy(), dtype=np.int64)

    ids, offsets = flat(SAMPLE_IDS_COLUMN)
    counts, _ = flat(SAMPLE_COUNTS_COLUMN)
    stored, _ = flat(sample_logprob_column(codec))
    offsets = offsets - offsets[0]
    if proposal_temperature != 1.0:
        normalizer = table.column(SAMPLE_NORMALIZER_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    else:
        normalizer = np.zeros(len(offsets) - 1, dtype=np.float32)
    return SampledTargets(
        ids=torch.from_numpy(ids.astype(np.int64)),
        counts=torch.from_numpy(counts.astype(np.int64)),
        logprobs=torch.from_numpy(codec.decode_numpy(np.array(stored)).astype(np.float32)),
        offsets=torch.from_numpy(offsets),
        log_normalizer=torch.from_numpy(np.array(normalizer, dtype=np.float32)),
        samples=samples,
        proposal_temperature=proposal_temperature,
    )


SAMPLED = register(Sampled())
