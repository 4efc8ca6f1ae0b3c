"""Stored soft labels equal an independent computation from a direct forward of the teachers.

Every expectation here is recomputed in the test: the teachers are rebuilt from their factories and
loaded with safetensors, run directly (sequences one row at a time, unpadded), and turned into
log-probabilities with ``log_softmax`` in float64; top-k comes from ``torch.topk``. The only
tolerance is the float16 storage of ``topk_logprobs`` (and a loose one for bf16 teacher compute):
every run here passes ``--logprob-dtype float16`` explicitly, the tightest float storage, so the
comparison sees the computation and not the (default, bfloat16) rounding. test_codec checks each
storage dtype against its own documented bound.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import (
    DIGITS_TEACHERS,
    classifier_table,
    frame_table,
    read_output,
    run_cli,
    save_teacher,
    shard_paths,
    token_table,
    write_parquet,
)

ROWS = 117
ROWS_PER_SHARD = 25
BATCH = 7
FP16_RTOL = 1e-3  # float16 keeps 11 significant bits: relative rounding error <= 2**-11
FP16_ATOL = 1e-5
TIE = 1e-5  # independent top-k values closer than this may legitimately come in either order

WIDE_VOCAB = 70001
BOUNDARY_VOCAB = 65536


def wide_model() -> nn.Module:
    """A test-only teacher whose vocabulary (70,001) needs uint32 ids."""
    return nn.Linear(8, WIDE_VOCAB)


def boundary_model() -> nn.Module:
    """A test-only teacher with exactly 65,536 classes: the largest vocabulary stored as uint16."""
    return nn.Linear(8, BOUNDARY_VOCAB)


# --------------------------------------------------------------------------- helpers


def load_direct(spec: str) -> nn.Module:
    """Rebuild ``module:factory@weights.safetensors`` by hand (not through softlabels.teachers)."""
    target, _, weights = spec.partition("@")
    module_name, _, factory = target.partition(":")
    model = getattr(importlib.import_module(module_name), factory)()
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


def generate(out: Path, corpus: Path, teachers: list[str], *flags: object) -> Path:
    args: list[object] = ["generate", corpus, "--out", out, "--no-progress", "--id-column", "id", "--logprob-dtype", "float16"]
    for spec in teachers:
        args += ["--teacher", spec]
    result = run_cli(*args, *flags)
    assert result.code == 0, result.err
    return out


def per_position(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """([N, k] values of every stored position in row order, [R] positions per row)."""
    lists = table.column(column).combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    inner = lists.flatten()
    assert pa.types.is_fixed_size_list(inner.type)
    k = inner.type.list_size
    return inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k), lengths


def fixed_inputs(table: pa.Table) -> torch.Tensor:
    column = table.column("inputs").combine_chunks()
    width = column.type.list_size
    return torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width))


def ensemble_expected(member_logits: list[torch.Tensor], mode: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float64 ensemble log-probabilities [N, V] and each member's log-probabilities."""
    members = [torch.log_softmax(logits.double(), dim=-1) for logits in member_logits]
    if len(members) == 1:
        combined = members[0]
    elif mode == "probs":
        combined = torch.log(torch.stack([m.exp() for m in members]).mean(dim=0))
    elif mode == "logprobs":
        combined = torch.log_softmax(torch.stack(members).mean(dim=0), dim=-1)
    else:
        raise AssertionError(mode)
    return combined.numpy(), [m.numpy() for m in members]


def assert_topk_exact(ids: np.ndarray, values: np.ndarray, expected: np.ndarray) -> None:
    """Stored ids/values are the independent top-k of ``expected`` (log-probs [N, V])."""
    n, k = ids.shape
    vocab = expected.shape[1]
    assert values.shape == (n, k) and expected.shape[0] == n
    ids = ids.astype(np.int64)
    assert ids.min() >= 0 and ids.max() < vocab
    assert all(len(set(row)) == k for row in ids.tolist()), "a position repeats a class id"
    stored = values.astype(np.float64)
    # the value stored next to each id is that id's log-probability under the full distribution
    np.testing.assert_allclose(stored, np.take_along_axis(expected, ids, axis=1), rtol=FP16_RTOL, atol=FP16_ATOL)
    # and they are the k largest, most probable first
    top_values, top_ids = torch.topk(torch.from_numpy(expected), min(k + 1, vocab), dim=-1)
    top_values, top_ids = top_values.numpy(), top_ids.numpy()
    np.testing.assert_allclose(stored, top_values[:, :k], rtol=FP16_RTOL, atol=FP16_ATOL)
    tied = np.zeros((n, k), dtype=bool)
    gaps = np.abs(np.diff(top_values, axis=1)) < TIE  # gaps[:, j] compares ranks j and j+1
    tied[:, 1:] |= gaps[:, : k - 1]  # rank j ties with rank j-1
    upper = min(k, gaps.shape[1])
    tied[:, :upper] |= gaps[:, :upper]  # rank j ties with rank j+1 (rank k is the first one not stored)
    mismatched = (ids != top_ids[:, :k]) & ~tied
    assert not mismatched.any(), f"ids differ from torch.topk at {np.argwhere(mismatched)[:5].tolist()}"
    assert tied.mean() < 0.05, "too many near-ties for the order check to mean anything"


def entropy_of(logp: np.ndarray) -> np.ndarray:
    return -(np.exp(logp) * logp).sum(axis=-1)


def row_mean(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.add.reduceat(values, starts) / lengths


def assert_stats(table: pa.Table, expected: np.ndarray, members: list[np.ndarray], lengths: np.ndarray) -> None:
    """confidence, entropy and agreement are the per-row means of the independent per-position values."""
    confidence = table.column("confidence").to_numpy()
    entropy = table.column("entropy").to_numpy()
    assert table.schema.field("confidence").type == pa.float32()
    np.testing.assert_allclose(confidence, row_mean(np.exp(expected.max(axis=1)), lengths), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy, row_mean(entropy_of(expected), lengths), rtol=1e-4, atol=1e-5)
    if len(members) == 1:
        assert "agreement" not in table.column_names
        return
    best = expected.argmax(axis=1)
    votes = np.mean([m.argmax(axis=1) == best for m in members], axis=0)
    agreement = table.column("agreement").to_numpy()
    np.testing.assert_allclose(agreement, row_mean(votes, lengths), atol=1e-6)
    assert 0 < agreement.mean() <= 1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exactness")


@pytest.fixture(scope="module")
def seeded_digits(workdir: Path) -> list[str]:
    return [save_teacher("softlabels.models:digits_mlp", seed, workdir / f"digits_{seed}.safetensors") for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def classifier_corpus(workdir: Path) -> tuple[Path, pa.Table]:
    table = classifier_table(ROWS, seed=5)
    return write_parquet(table, workdir / "classifier.parquet"), table


TEACHER_SETS = {
    "seeded-1": lambda seeded: seeded[:1],
    "committed-1": lambda seeded: DIGITS_TEACHERS[:1],
    "seeded-3": lambda seeded: seeded,
    "committed-3": lambda seeded: list(DIGITS_TEACHERS),
    "mixed-2": lambda seeded: [seeded[1], DIGITS_TEACHERS[2]],
}


# --------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("teacher_set, mode", [
    ("seeded-1", "probs"), ("committed-1", "probs"),
    ("seeded-3", "probs"), ("committed-3", "probs"), ("mixed-2", "probs"),
    ("seeded-3", "logprobs"), ("committed-3", "logprobs"), ("mixed-2", "logprobs"),
])
def test_classifier_full_vocab_equals_independent(tmp_path, classifier_corpus, seeded_digits, teacher_set, mode):
    teachers = TEACHER_SETS[teacher_set](seeded_digits)
    corpus, source = classifier_corpus
    out = generate(tmp_path / "out", corpus, teachers, "--top-k", 10, "--ensemble", mode,
                   "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", BATCH)
    table = read_output(out)
    assert table.column("sample_id").to_pylist() == source.column("id").to_pylist()

    x = fixed_inputs(source)
    with torch.no_grad():
        expected, members = ensemble_expected([load_direct(spec)(x) for spec in teachers], mode)
    ids, lengths = per_position(table, "topk_ids")
    values, value_lengths = per_position(table, "topk_logprobs")
    assert (lengths == 1).all() and (value_lengths == 1).all(), "a classifier row has exactly one position"
    assert ids.shape == (ROWS, 10)
    assert_topk_exact(ids, values, expected)
    # k = V: the stored probabilities are the whole distribution
    np.testing.assert_allclose(np.exp(values.astype(np.float64)).sum(axis=1), 1.0, atol=3e-3)
    assert_stats(table, expected, members, lengths)


@pytest.mark.parametrize("teacher_set", ["seeded-1", "seeded-3", "committed-3"])
def test_classifier_top5_is_independent_top5_with_tail_mass(tmp_path, classifier_corpus, seeded_digits, teacher_set):
    teachers = TEACHER_SETS[teacher_set](seeded_digits)
    corpus, source = classifier_corpus
    out = generate(tmp_path / "out", corpus, teachers, "--top-k", 5, "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", BATCH)
    table = read_output(out)
    with torch.no_grad():
        expected, members = ensemble_expected([load_direct(spec)(fixed_inputs(source)) for spec in teachers], "probs")
    ids, lengths = per_position(table, "topk_ids")
    values, _ = per_position(table, "topk_logprobs")
    assert ids.shape == (ROWS, 5)
    assert_topk_exact(ids, values, expected)

    captured = np.exp(values.astype(np.float64)).sum(axis=1)
    probs = np.exp(expected)
    outside = np.ones_like(probs, dtype=bool)
    np.put_along_axis(outside, ids.astype(np.int64), False, axis=1)
    tail = (probs * outside).sum(axis=1)
    np.testing.assert_allclose(1.0 - captured, tail, atol=3e-3)
    if teacher_set.startswith("seeded"):  # untrained teachers leave real mass outside the top 5
        assert (captured < 1).all() and tail.min() > 0.05
    assert_stats(table, expected, members, lengths)


# --------------------------------------------------------------------------- sequences


def _sequence_rows(source: pa.Table) -> list[np.ndarray]:
    return [np.asarray(row) for row in source.column("inputs").to_pylist()]


@pytest.mark.parametrize(
    "factory, make_table, seeds, top_k, mode, by_length",
    [
        ("token_gru", token_table, (1,), 20, "probs", ()),
        ("token_gru", token_table, (1, 2), 97, "logprobs", ()),
        ("frame_tagger", frame_table, (3,), 37, "probs", ()),
        ("frame_tagger", frame_table, (3, 4, 5), 6, "probs", ()),
        ("token_gru", token_table, (1, 2), 20, "probs", ("--batch-positions", 53)),
        ("frame_tagger", frame_table, (3,), 37, "probs", ("--batch-positions", 41)),
    ],
    ids=["tokens-1-k20", "tokens-2-kV-logprobs", "frames-1-kV", "frames-3-k6", "tokens-2-by-length", "frames-1-by-length"],
)
def test_sequence_positions_equal_unpadded_forward(tmp_path, factory, make_table, seeds, top_k, mode, by_length):
    """Batches of rows in corpus order, or by length (``--batch-positions``): every stored position is
    what a batch of one gives, and the shards keep corpus order."""
    teachers = [save_teacher(f"softlabels.models:{factory}", s, tmp_path / f"{factory}_{s}.safetensors") for s in seeds]
    source = make_table(ROWS, seed=7)
    corpus = write_parquet(source, tmp_path / "corpus.parquet")
    out = generate(tmp_path / "out", corpus, teachers, "--top-k", top_k, "--ensemble", mode,
                   "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", BATCH, *by_length)
    table = read_output(out)
    assert table.column("sample_id").to_pylist() == source.column("id").to_pylist()

    rows = _sequence_rows(source)
    input_lengths = np.array([len(r) for r in rows])
    assert input_lengths.min() == 1 and input_lengths.max() >= 20  # ragged, including length 1
    models = [load_direct(spec) for spec in teachers]
    member_logits: list[list[torch.Tensor]] = [[] for _ in models]
    with torch.no_grad():
        for row in rows:  # each row alone: batch of one, no padding at all
            x = torch.from_numpy(row.astype(np.int64 if row.dtype.kind in "iu" else np.float32))[None]
            lengths = torch.tensor([len(row)], dtype=torch.int64)
            for logits, model in zip(member_logits, models):
                output = model(x, lengths)
                assert output.shape[:2] == (1, len(row))
                logits.append(output[0])
    expected, members = ensemble_expected([torch.cat(parts) for parts in member_logits], mode)

    ids, lengths = per_position(table, "topk_ids")
    values, value_lengths = per_position(table, "topk_logprobs")
    np.testing.assert_array_equal(lengths, input_lengths)
    np.testing.assert_array_equal(value_lengths, input_lengths)
    assert ids.shape == (int(input_lengths.sum()), top_k)
    assert_topk_exact(ids, values, expected)
    assert_stats(table, expected, members, lengths)


# --------------------------------------------------------------------------- id width


def test_test_module_factories_are_importable_by_spec():
    """The wide teachers below are named ``test_exactness:...``; that import must resolve to this file."""
    module = importlib.import_module("test_exactness")
    assert module.wide_model is wide_model
    assert Path(module.__file__).resolve() == Path(__file__).resolve()
    assert str(Path(__file__).resolve().parent) in {str(Path(p).resolve()) for p in sys.path if p}


@pytest.mark.parametrize("factory, vocab, id_type", [
    ("wide_model", WIDE_VOCAB, pa.uint32()),
    ("boundary_model", BOUNDARY_VOCAB, pa.uint16()),
])
def test_id_width_follows_vocab_size(tmp_path, factory, vocab, id_type):
    spec = save_teacher(f"test_exactness:{factory}", 21, tmp_path / f"{factory}.safetensors")
    source = classifier_table(30, seed=9, features=8)
    corpus = write_parquet(source, tmp_path / "corpus.parquet")
    out = generate(tmp_path / "out", corpus, [spec], "--top-k", 8, "--rows-per-shard", 13, "--batch-size", 4)
    assert shard_paths(out)
    for shard in shard_paths(out):
        field_type = pq.read_schema(shard).field("topk_ids").type
        assert field_type == pa.list_(pa.list_(id_type, 8)), field_type
    table = read_output(out)
    with torch.no_grad():
        expected, members = ensemble_expected([load_direct(spec)(fixed_inputs(source))], "probs")
    ids, lengths = per_position(table, "topk_ids")
    values, _ = per_position(table, "topk_logprobs")
    assert expected.shape[1] == vocab
    assert ids.max() >= 60000, "the check should see ids near the top of the range"
    if id_type == pa.uint32():
        assert ids.max() > 65535, "ids above 65,535 must survive storage"
    assert_topk_exact(ids, values, expected)
    assert_stats(table, expected, members, lengths)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("kind", ["classifier", "frames"])
def test_bf16_is_close_to_fp32(tmp_path, classifier_corpus, kind):
    if kind == "classifier":
        teachers = list(DIGITS_TEACHERS)
        corpus, source = classifier_corpus
        with torch.no_grad():
            expected, _ = ensemble_expected([load_direct(s)(fixed_inputs(source)) for s in teachers], "probs")
        top_k = 10
    else:
        teachers = [save_teacher("softlabels.models:frame_tagger", 8, tmp_path / "frames.safetensors")]
        source = frame_table(40, seed=2)
        corpus = write_parquet(source, tmp_path / "frames.parquet")
        model = load_direct(teachers[0])
        with torch.no_grad():
            expected = np.concatenate([
                torch.log_softmax(model(torch.tensor(r, dtype=torch.float32)[None], torch.tensor([len(r)]))[0].double(), -1).numpy()
                for r in _sequence_rows(source)
            ])
        top_k = 12
    common = ["--top-k", top_k, "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", BATCH]
    bf16 = read_output(generate(tmp_path / "bf16", corpus, teachers, "--precision", "bf16", *common))
    fp32 = read_output(generate(tmp_path / "fp32", corpus, teachers, *common))
    ids, _ = per_position(bf16, "topk_ids")
    values, _ = per_position(bf16, "topk_logprobs")
    values = values.astype(np.float64)
    fp32_values, _ = per_position(fp32, "topk_logprobs")

    # bf16 keeps 8 significant bits: log-probabilities move by a few hundredths, never more
    gathered = np.take_along_axis(expected, ids.astype(np.int64), axis=1)
    np.testing.assert_allclose(values, gathered, rtol=0.03, atol=0.1)
    np.testing.assert_allclose(values, fp32_values.astype(np.float64), rtol=0.03, atol=0.1)
    assert (ids[:, 0] == expected.argmax(axis=1)).mean() > 0.9
    assert not np.array_equal(values, fp32_values.astype(np.float64)), "--precision bf16 changed nothing"
    assert (np.diff(values, axis=1) <= 1e-6).all(), "values are stored most probable first"
    np.testing.assert_allclose(bf16.column("confidence").to_numpy(), fp32.column("confidence").to_numpy(), atol=0.03)
