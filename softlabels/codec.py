"""How the top-k log-probabilities are stored: ``float16`` (default), ``bfloat16`` or ``uint8``.

Ids cost 2 bytes per class at V <= 65,536 whatever the codec, so the log-probabilities are the part
worth squeezing: at k=20 on the KJV corpus they are about 40% of the soft-label bytes in float16.

* ``float16``: a ``float16`` column; relative error at most 2^-11 (absolute 0.0005 nats at -1).
* ``bfloat16``: a ``float32`` column holding bfloat16-rounded values. Any Parquet reader sees plain
  floats, and BYTE_STREAM_SPLIT puts the two always-zero low bytes in their own streams, which zstd
  shrinks to almost nothing, so the file costs what 2-byte bfloat16 would. Relative error 2^-8.
* ``uint8``: square-root quantisation. A code q in 0..255 decodes to ``-(q * scale)**2`` with
  ``scale = sqrt(25) / 255`` (in every shard header as ``logprob_scale``), so the codes are dense
  where the probability mass is: for a log-probability lp >= -25 the decoded value is off by at most
  ``scale * sqrt(-lp) + scale**2 / 4`` nats (0.002 at -0.01, 0.020 at -1, 0.044 at -5), and the
  probability by at most 0.0085 anywhere; below -25 (probability < 1.4e-11) it decodes to -25. A
  linear code over the same range would be off by up to 0.049 nats near the top-1, where it matters.

Decoding in Polars: ``-(pl.col("topk_logprobs") ... .cast(pl.Float64) * scale) ** 2`` element-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

__all__ = ["LOGPROB_DTYPES", "UINT8_FLOOR", "LogprobCodec"]

LOGPROB_DTYPES = ("float16", "bfloat16", "uint8")
UINT8_FLOOR = 25.0
UINT8_LEVELS = 255
FLOAT16_LOWEST = float(np.finfo(np.float16).min)


@dataclass(frozen=True)
class LogprobCodec:
    """One storage format for [..., k] log-probabilities.

    Attributes:
        dtype: one of ``LOGPROB_DTYPES``.
        scale: uint8 only, the decoding step in sqrt(-log p) units.
    """

    dtype: str = "float16"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "uint8" and not (self.scale is not None and self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"uint8 log-probabilities need a positive scale, got {self.scale!r}")

    @classmethod
    def named(cls, dtype: str) -> "LogprobCodec":
        """The codec a new run uses for ``--logprob-dtype dtype``."""
        return cls(dtype, math.sqrt(UINT8_FLOOR) / UINT8_LEVELS if dtype == "uint8" else None)

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "LogprobCodec":
        """The codec recorded in a shard header or manifest (float16 when absent, as in early shards)."""
        return cls(header.get("logprob_dtype", "float16"), header.get("logprob_scale"))

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
