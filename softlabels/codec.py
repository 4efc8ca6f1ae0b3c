"""How the top-k log-probabilities are stored: ``bfloat16`` (default), ``float16`` or ``uint8``.

Ids cost 2 bytes per class at V <= 65,536 whatever the codec, so the log-probabilities are the part
worth squeezing: at k=20 on the KJV corpus they are about 40% of the soft-label bytes in float16.

* ``bfloat16`` (default): a ``float32`` column holding bfloat16-rounded values. Every Parquet reader
  (DuckDB, Spark, pandas, HF datasets) sees plain floats, and BYTE_STREAM_SPLIT puts the two
  always-zero low bytes in their own streams, which zstd shrinks to almost nothing, so the file
  costs what 2-byte bfloat16 would. Relative error 2^-8.
* ``float16``: a ``float16`` column, plainly encoded (DuckDB cannot read float16 BYTE_STREAM_SPLIT,
  duckdb#17114); Spark cannot read float16 at all. Relative error at most 2^-11.
* ``uint8``: square-root quantisation, in a column named ``topk_logprob_codes`` (never
  ``topk_logprobs``: these are codes, not log-probabilities) whose Arrow field metadata carries
  ``softlabels.codes = uint8-sqrt`` and ``softlabels.scale``. A code q in 0..255 decodes to ``-(q * scale)**2`` with
  ``scale = sqrt(25) / 255`` (in every shard header as ``logprob_scale``), so the codes are dense
  where the probability mass is: for a log-probability lp >= -25 the decoded value is off by at most
  ``scale * sqrt(-lp) + scale**2 / 4`` nats (0.002 at -0.01, 0.020 at -1, 0.044 at -5), and the
  probability by at most 0.0085 anywhere; below -25 (probability < 1.4e-11) it decodes to -25. A
  linear code over the same range would be off by up to 0.049 nats near the top-1, where it matters.

Decoding in Polars: ``-(pl.col("topk_logprob_codes") ... .cast(pl.Float64) * scale) ** 2`` element-wise.

Format ``softlabels.v1`` stored every dtype in ``topk_logprobs`` and relied on the header alone;
``from_header`` still reads those shards. A reader that has lost the header (a Parquet reader that
drops key-value metadata, as HF datasets does) gets a codec from ``from_columns``,
which decode plain floats and refuse codes whose scale is gone: never a silent misdecode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from .errors import UserError
from .options import DEFAULT_LOGPROB_DTYPE, LOGPROB_DTYPES

__all__ = ["leaf_type", "LOGPROB_DTYPES", "DEFAULT_LOGPROB_DTYPE", "LOGPROB_COLUMN", "CODES_COLUMN", "UINT8_FLOOR", "LogprobCodec"]

LOGPROB_COLUMN = "topk_logprobs"
CODES_COLUMN = "topk_logprob_codes"
CODES_KEY = b"softlabels.codes"
SCALE_KEY = b"softlabels.scale"
DECODE_KEY = b"softlabels.decode"
CODES_KIND = b"uint8-sqrt"
UINT8_FLOOR = 25.0
UINT8_LEVELS = 255
FLOAT16_LOWEST = float(np.finfo(np.float16).min)
_LOST_SCALE = (f"column {CODES_COLUMN!r} holds uint8 codes, but their scale is gone with the shard header and field metadata; "
               "pass the codec of the directory's manifest (LogprobCodec.from_header(manifest))")


def leaf_type(value_type: pa.DataType) -> pa.DataType:
    """The element type inside any nesting of (fixed-size, large) lists."""
    while pa.types.is_list(value_type) or pa.types.is_fixed_size_list(value_type) or pa.types.is_large_list(value_type):
        value_type = value_type.value_type
    return value_type


@dataclass(frozen=True)
class LogprobCodec:
    """One storage format for [..., k] log-probabilities.

    Attributes:
        dtype: one of ``LOGPROB_DTYPES``.
        scale: uint8 only, the decoding step in sqrt(-log p) units.
        column: the shard column holding the stored values (``topk_logprob_codes`` for uint8 from
            format v2 on, else ``topk_logprobs``).
    """

    dtype: str = DEFAULT_LOGPROB_DTYPE
    scale: float | None = None
    column: str = LOGPROB_COLUMN

    def __post_init__(self) -> None:
        if self.dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "uint8" and not (self.scale is not None and self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"uint8 log-probabilities need a positive scale, got {self.scale!r}")

    @classmethod
    def named(cls, dtype: str) -> "LogprobCodec":
        """The codec a new run uses for ``--logprob-dtype dtype``."""
        if dtype == "uint8":
            return cls(dtype, math.sqrt(UINT8_FLOOR) / UINT8_LEVELS, CODES_COLUMN)
        return cls(dtype)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "LogprobCodec":
        """The codec recorded in a shard header or manifest (float16 when absent, as in the first shards)."""
        dtype = header.get("logprob_dtype", "float16")
        v1 = header.get("format", "softlabels.v1") == "softlabels.v1"
        return cls(dtype, header.get("logprob_scale"), CODES_COLUMN if dtype == "uint8" and not v1 else LOGPROB_COLUMN)

    @classmethod
    def from_columns(cls, schema: pa.Schema) -> "LogprobCodec":
        """The codec of shard rows whose header is gone: from the stored field's own metadata and type.

        Raises:
            UserError: uint8 codes without their scale (the field metadata is gone too), or no
                log-probability column at all.
        """
        if schema.get_field_index(CODES_COLUMN) >= 0:
            metadata = schema.field(CODES_COLUMN).metadata or {}
            if metadata.get(CODES_KEY) == CODES_KIND and SCALE_KEY in metadata:
                return cls("uint8", float(metadata[SCALE_KEY]), CODES_COLUMN)
            raise UserError(_LOST_SCALE)
        if schema.get_field_index(LOGPROB_COLUMN) >= 0:
            leaf = leaf_type(schema.field(LOGPROB_COLUMN).type)
            if pa.types.is_integer(leaf):
                raise UserError(f"column {LOGPROB_COLUMN!r} holds integer codes and the shard header that says how to decode them is gone; "
                                "pass the codec of the directory's manifest (LogprobCodec.from_header)")
            return cls("float16" if pa.types.is_float16(leaf) else "bfloat16")
        raise UserError(f"no {LOGPROB_COLUMN!r} or {CODES_COLUMN!r} column in these shard rows")

    def field_metadata(self) -> dict[bytes, bytes] | None:
        """Arrow field metadata of the stored column: uint8 codes say what they are and how to decode them."""
        if self.column != CODES_COLUMN:
            return None
        return {CODES_KEY: CODES_KIND, SCALE_KEY: repr(self.scale).encode(), DECODE_KEY: b"logprob = -(code * scale)^2"}

    def header_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"logprob_dtype": self.dtype}
        if self.scale is not None:
            fields["logprob_scale"] = self.scale
        return fields

    @property
    def arrow_type(self) -> pa.DataType:
        return {"float16": pa.float16(), "bfloat16": pa.float32(), "uint8": pa.uint8()}[self.dtype]

    def encode(self, logprobs: torch.Tensor) -> torch.Tensor:
        """[..., k] float log-probabilities -> the stored values (float16, float32 or uint8)."""
        values = logprobs.float().clamp(min=FLOAT16_LOWEST, max=0.0)
        if self.dtype == "float16":
            return values.half()
        if self.dtype == "bfloat16":
            return values.bfloat16().float()
        codes = torch.sqrt(-values) / self.scale
        return codes.round().clamp(max=UINT8_LEVELS).to(torch.uint8)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored values -> float32 log-probabilities."""
        if self.dtype == "uint8":
            return -(stored.float() * self.scale) ** 2
        return stored.float()

    def roundtrip(self, logprobs: torch.Tensor) -> torch.Tensor:
        """What a reader gets back for ``logprobs``."""
        return self.decode(self.encode(logprobs))

    def encode_numpy(self, logprobs: np.ndarray) -> np.ndarray:
        return self.encode(torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))).numpy()

    def decode_numpy(self, stored: np.ndarray) -> np.ndarray:
        return self.decode(torch.from_numpy(np.ascontiguousarray(stored))).numpy()

    def decode_polars(self, stored: pl.Expr) -> pl.Expr:
        """A Polars expression decoding stored values (element-wise) to float64 log-probabilities."""
        values = stored.cast(pl.Float64)
        return -((values * self.scale) ** 2) if self.dtype == "uint8" else values

    def error_bound(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Largest |decoded - true| for each true log-probability (above the uint8 floor)."""
        values = logprobs.float().clamp(max=0.0)
        if self.dtype == "uint8":
            return self.scale * torch.sqrt(-values) + self.scale**2 / 4
        relative = 2.0**-11 if self.dtype == "float16" else 2.0**-8
        return values.abs() * relative + 6e-8  # float16 subnormal spacing near 0
