"""topk: soft labels equal a dense float64 computation (torch.log_softmax, torch.topk, -sum p log p)
on awkward sizes, chunk by chunk and across chunk boundaries; chunking changes nothing; memory stays
bounded by the chunk."""

from __future__ import annotations

import math

import pytest
import torch

import softlabels.targets.topk as topk
from softlabels.codec import LogprobCodec

POSITIONS = 117
PER_ROW = torch.tensor([1, 5, 23, 40, 48])  # 117 positions in 5 rows of ragged length


def dense_expected(members: list[torch.Tensor], mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Float64 ensemble log-probabilities [N, V] and the members' log-probabilities, computed whole."""
    logs = [torch.log_softmax(m.double(), dim=-1) for m in members]
    if len(logs) == 1:
        return logs[0], logs
    if mode == "probs":
        return torch.stack([m.exp() for m in logs]).mean(dim=0).log(), logs
    return torch.log_softmax(torch.stack(logs).mean(dim=0), dim=-1), logs


def dense_entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)  # 0 log 0 = 0


def row_means(values: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    return torch.stack([part.mean() for part in torch.split(values, per_row.tolist())])


def dense_stored_kl(log_p: torch.Tensor, ids: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """KL(full || rebuilt) with the rebuilt distribution spelt out over all V classes."""
    classes, k = log_p.shape[1], ids.shape[1]
    tail = (1.0 - stored.exp().sum(dim=-1)).clamp(min=1e-12)
    rebuilt = (tail / max(classes - k, 1))[:, None].expand_as(log_p).clone()
    rebuilt.scatter_(1, ids, stored.exp())
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - rebuilt.log()), torch.zeros_like(p)).sum(dim=-1)


def assert_matches_dense(labels: topk.SoftLabels, members: list[torch.Tensor], k: int, mode: str) -> None:
    expected, member_logs = dense_expected(members, mode)
    want_values, _ = torch.topk(expected, k, dim=-1)
    ids = labels.ids
    assert ids.dtype == torch.int64 and ids.shape == (POSITIONS, k)
    assert all(len(set(row)) == k for row in ids.tolist()), "a position repeats a class id"
    # each stored value is its id's log-probability, and they are the k largest, most probable first
    torch.testing.assert_close(labels.logprobs.double(), expected.gather(1, ids), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(labels.logprobs.double(), want_values, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(labels.captured_mass.double(), expected.gather(1, ids).exp().sum(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(labels.confidence.double(), row_means(want_values[:, 0].exp(), PER_ROW), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(labels.entropy.double(), row_means(dense_entropy(expected), PER_ROW), rtol=1e-5, atol=2e-5)
    stored = LogprobCodec().roundtrip(labels.logprobs).double()
    torch.testing.assert_close(labels.stored_kl.double(), dense_stored_kl(expected, ids, stored).clamp(min=0.0), rtol=1e-3, atol=5e-5)
    if len(members) == 1:
        assert labels.agreement is None
    else:
        best = expected.argmax(dim=-1)
        votes = torch.stack([m.argmax(dim=-1) == best for m in member_logs]).double().mean(dim=0)
        torch.testing.assert_close(labels.agreement.double(), row_means(votes, PER_ROW), rtol=1e-6, atol=1e-6)


def awkward_logits(teachers: int, classes: int, seed: int, masked: bool) -> list[torch.Tensor]:
    """[117, classes] logits per teacher; with ``masked``, some classes are -inf (everywhere, in one
    teacher only, or in a single position)."""
    generator = torch.Generator().manual_seed(seed)
    members = [torch.randn(POSITIONS, classes, generator=generator) * 3 for _ in range(teachers)]
    if masked:
        for member in members:
            member[:, classes - 5 :] = -math.inf  # padded vocabulary entries
            member[7, : classes // 2] = -math.inf  # one position with half its classes masked
        members[0][:, 11] = -math.inf  # masked by one member only
    return members


@pytest.mark.parametrize("teachers, mode", [(1, "probs"), (2, "probs"), (2, "logprobs"), (3, "probs"), (3, "logprobs")])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [8, 64])
def test_soft_labels_equal_dense_computation(monkeypatch, teachers, mode, masked, block):
    """V = 1,003, k = 7: with 8-class blocks (125 blocks and 3 classes left over) the block top-k
    runs, with 64 (15 blocks < 4k) the plain one; 10-position chunks, the last of 7."""
    members = awkward_logits(teachers, 1003, seed=teachers * 10 + masked, masked=masked)
    monkeypatch.setattr(topk, "TOPK_BLOCK", block)
    monkeypatch.setattr(topk, "CPU_CHUNK_ELEMENTS", 1003 * 10)
    labels = topk.soft_labels(members, PER_ROW, 7, mode)
    assert_matches_dense(labels, members, 7, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_teacher_at_llm_width_equals_dense_computation(dtype):
    """V = 49,152 (SmolLM2) in the teacher's dtype, one chunk boundary crossed; bf16 logits tie often."""
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(POSITIONS, 49152, generator=generator) * 2).to(dtype)
    logits[3, :1000] = -math.inf
    labels = topk.soft_labels([logits], PER_ROW, 20, "probs")
    assert topk.CPU_CHUNK_ELEMENTS // 49152 < POSITIONS
    assert_matches_dense(labels, [logits.float()], 20, "probs")


@pytest.mark.parametrize("classes, k", [(1003, 1), (1003, 7), (4096, 20), (49152 // 16, 20), (777, 777)])
def test_block_topk_equals_torch_topk(monkeypatch, classes, k):
    """Values and the ids' values equal torch.topk, NaN counts as largest, ties included (rounded
    to a coarse grid so that many values are equal)."""
    monkeypatch.setattr(topk, "TOPK_BLOCK", 16)
    generator = torch.Generator().manual_seed(classes + k)
    values = (torch.randn(POSITIONS, classes, generator=generator) * 4).round()
    values[5, 3] = math.nan
    values[6, :] = -math.inf
    values[8, classes - 1] = 100.0  # the largest value among the leftover classes
    best, ids = topk.block_topk(values, k)
    want, _ = torch.topk(values, k, dim=-1)
    torch.testing.assert_close(best, want, equal_nan=True)
    torch.testing.assert_close(values.gather(1, ids), want, equal_nan=True)
    assert all(len(set(row)) == k for row in ids.tolist())
    again, again_ids = topk.block_topk(values, k)
    assert torch.equal(ids, again_ids), "the same input chooses the same ids"


@pytest.mark.parametrize("teachers, mode", [(1, "probs"), (3, "probs"), (3, "logprobs")])
def test_chunked_soft_labels_equal_one_block(monkeypatch, teachers, mode):
    torch.manual_seed(0)
    members = [torch.randn(117, 301) * 3 for _ in range(teachers)]
    monkeypatch.setattr(topk, "TOPK_BLOCK", 8)
    whole = topk.soft_labels(members, PER_ROW, 7, mode)
    monkeypatch.setattr(topk, "CPU_CHUNK_ELEMENTS", 301 * 10)  # 12 chunks of 10 positions, the last of 7
    chunked = topk.soft_labels(members, PER_ROW, 7, mode)
    assert (whole.agreement is None) == (chunked.agreement is None) == (teachers == 1)
    for name in ("ids", "logprobs", "confidence", "entropy", "agreement", "captured_mass", "stored_kl"):
        if getattr(whole, name) is not None:
            assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


@pytest.mark.parametrize("teachers", [1, 2])
def test_chunk_size_bounds_the_block(monkeypatch, teachers):
    """No fp32 temporary larger than a chunk: 16 positions per chunk at a 256k vocabulary on the CPU
    (32 on an accelerator), whatever the batch holds."""
    assert topk.CPU_CHUNK_ELEMENTS // 262144 == 16 and topk.CHUNK_ELEMENTS // 262144 == 32
    seen = []
    original = topk.block_topk

    def spy(values, k):
        seen.append(values.shape[0])
        return original(values, k)

    monkeypatch.setattr(topk, "block_topk", spy)
    monkeypatch.setattr(topk, "CPU_CHUNK_ELEMENTS", 1000 * 16)
    topk.soft_labels([torch.randn(100, 1000) for _ in range(teachers)], torch.tensor([100]), 5, "probs")
    assert max(seen) == 16 and sum(seen) == 100


@pytest.mark.parametrize("teachers, mode", [(1, "probs"), (2, "probs"), (3, "logprobs")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_usable_flags_nan_posinf_and_all_neginf_positions(monkeypatch, teachers, mode, dtype):
    """usable is False exactly where some teacher's logits hold a NaN or +Inf or are all -Inf (a few
    -Inf alone are masked classes); of_rows keeps the other rows' labels unchanged."""
    monkeypatch.setattr(topk, "TOPK_BLOCK", 8)
    monkeypatch.setattr(topk, "CPU_CHUNK_ELEMENTS", 1003 * 10)
    members = [m.to(dtype) for m in awkward_logits(teachers, 1003, seed=3, masked=True)]
    members[-1][2, 500] = math.nan
    members[0][50, 17] = math.inf
    members[0][116, :] = -math.inf
    members[-1][60, 1002] = math.nan  # among the classes left over by the blocks
    labels = topk.soft_labels(members, PER_ROW, 7, mode)
    bad = torch.stack([m.isnan().any(dim=-1) | m.isposinf().any(dim=-1) | m.isneginf().all(dim=-1) for m in members]).any(dim=0)
    assert bad.sum() == 4
    assert torch.equal(labels.usable, ~bad)

    keep = torch.tensor([True, False, True, True, False])  # rows 1 (positions 1-5) and 4 (69-116) dropped
    kept = labels.of_rows(keep, PER_ROW)
    positions = torch.cat([torch.arange(0, 1), torch.arange(6, 69)])
    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    for name in ("ids", "logprobs", "captured_mass", "stored_kl", "usable"):
        same(getattr(kept, name), getattr(labels, name)[positions])
    for name in ("confidence", "entropy") + (("agreement",) if teachers > 1 else ()):
        same(getattr(kept, name), getattr(labels, name)[keep])


def test_buffers_kept_between_calls_change_nothing(monkeypatch):
    """Calls of other sizes in between (fewer positions, another vocabulary) leave a call's result as it was alone."""
    monkeypatch.setattr(topk, "TOPK_BLOCK", 8)
    monkeypatch.setattr(topk, "CPU_CHUNK_ELEMENTS", 1003 * 10)
    first = awkward_logits(1, 1003, seed=21, masked=True)
    alone = topk.soft_labels(first, PER_ROW, 7, "probs")
    topk.soft_labels([torch.randn(3, 1003)], torch.tensor([3]), 7, "probs")  # reuses part of the held buffers
    topk.soft_labels([torch.randn(40, 2000)], torch.tensor([40]), 7, "probs")  # replaces them
    again = topk.soft_labels(first, PER_ROW, 7, "probs")
    for name in ("ids", "logprobs", "confidence", "entropy", "captured_mass", "stored_kl", "usable"):
        assert torch.equal(getattr(alone, name), getattr(again, name)), name
