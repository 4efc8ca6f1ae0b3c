"""How faithful the stored top-k is to the full teacher distribution, so k is chosen from evidence.

Two figures per position, accumulated over every position of a run (not a sample):

* captured mass: the probability of the k stored ids (mean and 5th percentile);
* KL(full || stored-with-tail): the full teacher distribution against what a student can rebuild
  from the shard (the stored log-probabilities of the k ids, the remaining mass spread evenly over
  the other V - k ids), in nats.

The KL needs no extra pass over the vocabulary: with H the entropy already computed for the
``entropy`` column, KL = -H - sum_k p_i log p^_i - tau log(tau^ / (V - k)). The percentile comes
from a 1,000-bin histogram of captured mass (0.001 resolution), a few hundred bytes per shard in
the journal, merged exactly across shards and ranks.

Sampled targets (``generate --targets sample``) are not a truncation of the teacher, so neither
figure describes them: a position's N draws estimate the whole distribution without bias. What is
recorded instead is what they cost and cover: the distinct ids per position (the stored entries,
which the bytes follow) and the drawn mass, the teacher probability of those distinct ids
(``softlabels.targets.sampled``), in the same histogram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MASS_BINS", "Fidelity"]

MASS_BINS = 1000


@dataclass
class Fidelity:
    """Sums over positions: mass (captured top-k, or drawn), KL (top-k only), distinct ids (sampled only)."""

    positions: int = 0
    mass_sum: float = 0.0
    kl_sum: float = 0.0
    mass_histogram: np.ndarray = field(default_factory=lambda: np.zeros(MASS_BINS, dtype=np.int64))
    unique_sum: int = 0

    def add(self, captured_mass: np.ndarray, kl: np.ndarray) -> None:
        """Record top-k positions' captured mass [N] and KL(full || stored) [N]."""
        self.positions += len(captured_mass)
        self.mass_sum += float(np.sum(captured_mass, dtype=np.float64))
        self.kl_sum += float(np.sum(kl, dtype=np.float64))
        self._histogram(captured_mass)

    def add_sampled(self, drawn_mass: np.ndarray, unique: np.ndarray) -> None:
        """Record sampled positions' drawn mass [N] and distinct ids [N]."""
        self.positions += len(drawn_mass)
        self.mass_sum += float(np.sum(drawn_mass, dtype=np.float64))
        self.unique_sum += int(np.sum(unique, dtype=np.int64))
        self._histogram(drawn_mass)

    def _histogram(self, mass: np.ndarray) -> None:
        bins = np.clip((np.asarray(mass) * MASS_BINS).astype(np.int64), 0, MASS_BINS - 1)
        self.mass_histogram += np.bincount(bins, minlength=MASS_BINS)

    def merge(self, other: "Fidelity") -> None:
        self.positions += other.positions
        self.mass_sum += other.mass_sum
        self.kl_sum += other.kl_sum
        self.mass_histogram += other.mass_histogram
        self.unique_sum += other.unique_sum

    def to_json(self) -> dict[str, Any]:
        nonzero = np.flatnonzero(self.mass_histogram)
        record: dict[str, Any] = {"positions": self.positions, "mass_sum": self.mass_sum, "kl_sum": self.kl_sum,
                                  "mass_histogram": {str(int(i)): int(self.mass_histogram[i]) for i in nonzero}}
        if self.unique_sum:
            record["unique_sum"] = self.unique_sum
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Fidelity":
        histogram = np.zeros(MASS_BINS, dtype=np.int64)
        for index, count in record.get("mass_histogram", {}).items():
            histogram[int(index)] = count
        return cls(int(record.get("positions", 0)), float(record.get("mass_sum", 0.0)), float(record.get("kl_sum", 0.0)), histogram,
                   int(record.get("unique_sum", 0)))

    def percentile_mass(self, fraction: float) -> float:
        """Upper edge of the histogram bin holding the ``fraction`` quantile of captured mass."""
        if self.positions == 0:
            return float("nan")
        cumulative = np.cumsum(self.mass_histogram)
        index = int(np.searchsorted(cumulative, fraction * self.positions, side="left"))
        return min(index + 1, MASS_BINS) / MASS_BINS

    def summary(self) -> dict[str, float]:
        """A top-k run's manifest ``fidelity``: captured mass and KL (each target kind names its own figures:
        ``TargetKind.fidelity_summary``)."""
        count = max(self.positions, 1)
        return {
            "positions": self.positions,
            "captured_mass_mean": self.mass_sum / count,
            "captured_mass_p5": self.percentile_mass(0.05),
            "kl_full_vs_stored_mean": self.kl_sum / count,
        }
