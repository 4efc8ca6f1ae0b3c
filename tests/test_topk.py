"""topk: chunking over positions changes nothing; memory stays bounded by the chunk."""

from __future__ import annotations

import pytest
import torch

import softlabels.topk as topk


@pytest.mark.parametrize("mode", ["probs", "logprobs"])
def test_chunked_soft_labels_equal_one_block(monkeypatch, mode):
    torch.manual_seed(0)
    members = [torch.randn(117, 301) * 3 for _ in range(3)]
    per_row = torch.tensor([1, 5, 23, 40, 48])  # 117 positions in 5 rows of ragged length
    whole = topk.soft_labels(members, per_row, 7, mode)
    monkeypatch.setattr(topk, "CHUNK_ELEMENTS", 301 * 10)  # 12 chunks of 10 positions, the last of 7
    chunked = topk.soft_labels(members, per_row, 7, mode)
    for name in ("ids", "logprobs", "confidence", "entropy", "agreement", "captured_mass", "stored_kl"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


def test_chunk_size_bounds_the_block(monkeypatch):
    """At a 256k vocabulary a chunk is 32 positions: 32 MB per teacher, whatever the batch holds."""
    assert topk.CHUNK_ELEMENTS // 262144 == 32
    seen = []
    original = topk.ensemble_logprobs

    def spy(pieces, mode):
        seen.append(pieces[0].shape[0])
        return original(pieces, mode)

    monkeypatch.setattr(topk, "ensemble_logprobs", spy)
    monkeypatch.setattr(topk, "CHUNK_ELEMENTS", 1000 * 16)
    topk.soft_labels([torch.randn(100, 1000)], torch.tensor([100]), 5, "probs")
    assert max(seen) == 16 and sum(seen) == 100
