"""Compact log-probability storage (--logprob-dtype): error bounds, decoding everywhere, KD loss."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from conftest import read_output, run_cli, save_teacher, shard_paths, token_table, write_parquet
from softlabels.codec import LOGPROB_DTYPES, UINT8_FLOOR, LogprobCodec
from softlabels.data import SoftLabelDataset, collate
from softlabels.inspect import inspect
from softlabels.losses import kd_loss
from softlabels.models import TokenGRU
from softlabels.loading import load_model

ROWS = 117
TOP_K = 20


def peaked_gru() -> nn.Module:
    """A TokenGRU whose head is scaled up, so its distributions look like an LLM's: a confident
    top-1 at some positions, a long flat tail at others."""
    model = TokenGRU()
    with torch.no_grad():
        model.head.weight.mul_(torch.linspace(0.5, 12.0, model.head.weight.shape[0])[:, None])
    return model


def llm_like_logprobs(positions: int = 4000, vocab: int = 5000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sharpness = torch.rand(positions, 1, generator=generator) * 6
    logits = torch.randn(positions, vocab, generator=generator) * sharpness
    return torch.log_softmax(logits, dim=-1).topk(64, dim=-1).values


@pytest.mark.parametrize("dtype", LOGPROB_DTYPES)
def test_roundtrip_within_documented_bound(dtype):
    codec = LogprobCodec.named(dtype)
    values = torch.cat([
        llm_like_logprobs().reshape(-1),
        torch.tensor([0.0, -1e-7, -1e-4, -0.01, -0.5, -1.0, -5.0, -24.99, -25.0]),
        -torch.rand(10000, generator=torch.Generator().manual_seed(1)) * UINT8_FLOOR,
    ]).double()
    decoded = codec.roundtrip(values.float()).double()
    above = values >= -UINT8_FLOOR
    error = (decoded - values).abs()
    bound = codec.error_bound(values.float()).double() + 1e-6 * values.abs()  # float32 arithmetic
    assert bool((error[above] <= bound[above]).all()), float((error - bound)[above].max())
    if dtype == "uint8":
        # the bound is tight to within a factor of two, and the probability error stays below 0.0085
        assert float(error[above].max()) > 0.5 * float(codec.error_bound(torch.tensor(-UINT8_FLOOR)))
        assert float((decoded.exp() - values.exp()).abs().max()) <= 0.0085
        assert bool((codec.roundtrip(torch.tensor([-25.5, -40.0, -1e4])) == -UINT8_FLOOR).all())
        assert codec.roundtrip(torch.tensor([0.0])).item() == 0.0


def test_uint8_codes_are_monotone_in_the_log_probability():
    codec = LogprobCodec.named("uint8")
    values = torch.linspace(0, -30, 5001)
    codes = codec.encode(values).int()
    assert bool((codes[1:] >= codes[:-1]).all()) and codes[0] == 0 and codes[-1] == 255


def _generate(tmp_path, corpus, teacher, out_name, dtype, top_k=TOP_K):
    out = tmp_path / out_name
    result = run_cli("generate", corpus, "--teacher", teacher, "--out", out, "--id-column", "id", "--top-k", top_k,
                     "--rows-per-shard", 40, "--batch-size", 16, "--logprob-dtype", dtype, "--no-progress")
    assert result.code == 0, result.err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One corpus, one peaked teacher, shards in every dtype."""
    tmp_path = tmp_path_factory.mktemp("codec")
    corpus = write_parquet(token_table(ROWS, seed=5), tmp_path / "corpus.parquet")
    teacher = save_teacher("test_codec:peaked_gru", 3, tmp_path / "peaked.safetensors")
    outs = {dtype: _generate(tmp_path, corpus, teacher, f"out_{dtype}", dtype) for dtype in LOGPROB_DTYPES}
    return corpus, teacher, outs


def _teacher_topk(corpus, teacher):
    """Direct forward, one row at a time: exact fp32 top-k log-probabilities per position."""
    model, _ = load_model(teacher)
    rows = pq.read_table(corpus).column("inputs").to_pylist()
    values, ids = [], []
    with torch.no_grad():
        for row in rows:
            x = torch.tensor(row, dtype=torch.int64)[None]
            log_p = torch.log_softmax(model(x, torch.tensor([len(row)]))[0].float(), dim=-1)
            top = log_p.topk(TOP_K, dim=-1)
            values.append(top.values)
            ids.append(top.indices)
    return torch.cat(ids), torch.cat(values)


# where each dtype's stored values live: uint8 codes are not log-probabilities, so never in topk_logprobs
COLUMNS = {"bfloat16": "topk_logprobs", "float16": "topk_logprobs", "uint8": "topk_logprob_codes"}


def _stored(out):
    table = read_output(out)
    header = json.loads(pq.read_schema(shard_paths(out)[0]).metadata[b"softlabels"])
    ids = np.array([p for row in table.column("topk_ids").to_pylist() for p in row])
    raw = np.array([p for row in table.column(COLUMNS[header["logprob_dtype"]]).to_pylist() for p in row])
    return table, header, ids, raw


@pytest.mark.parametrize("dtype", LOGPROB_DTYPES)
def test_shards_store_the_dtype_and_decode_within_bound_of_the_teacher(runs, dtype):
    corpus, teacher, outs = runs
    table, header, ids, raw = _stored(outs[dtype])
    codec = LogprobCodec.from_header(header)
    assert codec.dtype == dtype and header["logprob_dtype"] == dtype
    manifest = json.loads((outs[dtype] / "manifest.json").read_text())
    assert manifest["logprob_dtype"] == dtype and manifest.get("logprob_scale") == header.get("logprob_scale")
    expected_type = {"float16": pa.float16(), "bfloat16": pa.float32(), "uint8": pa.uint8()}[dtype]
    column = COLUMNS[dtype]
    assert codec.column == column
    assert table.schema.field(column).type == pa.list_(pa.list_(expected_type, TOP_K))
    other = ({"topk_logprobs", "topk_logprob_codes"} - {column}).pop()
    assert other not in table.column_names
    metadata = pq.read_schema(shard_paths(outs[dtype])[0]).field(column).metadata or {}
    if dtype == "uint8":  # the codes say what they are and how to decode them, without the header
        assert metadata[b"softlabels.codes"] == b"uint8-sqrt"
        assert float(metadata[b"softlabels.scale"]) == header["logprob_scale"]
    else:
        assert b"softlabels.codes" not in metadata

    true_ids, true_values = _teacher_topk(corpus, teacher)
    np.testing.assert_array_equal(ids, true_ids.numpy())
    decoded = codec.decode_numpy(raw.astype(codec.arrow_type.to_pandas_dtype()))
    bound = codec.error_bound(true_values).numpy() + 2e-5  # batched vs one-row forward
    assert (np.abs(decoded - true_values.numpy()) <= bound).all()
    assert run_cli("verify", outs[dtype]).code == 0


@pytest.mark.parametrize("dtype", LOGPROB_DTYPES)
def test_loader_collate_and_inspect_decode(runs, dtype):
    _, _, outs = runs
    table, header, _, raw = _stored(outs[dtype])
    codec = LogprobCodec.from_header(header)
    decoded = codec.decode_numpy(raw.astype(codec.arrow_type.to_pandas_dtype()))

    dataset = SoftLabelDataset(outs[dtype], batch_size=13, shuffle=False)
    loaded = [b["topk_logprobs"][b["mask"]] for b in dataset]
    np.testing.assert_array_equal(torch.cat(loaded).numpy(), decoded)  # sorted ids = shard order here

    shard = pq.read_table(shard_paths(outs[dtype])[0])
    batch = collate(shard, None, None)  # the codec comes from the shard's own header
    first = codec.decode_numpy(np.array([p for row in shard.column(COLUMNS[dtype]).to_pylist() for p in row], dtype=codec.arrow_type.to_pandas_dtype()))
    np.testing.assert_array_equal(batch["topk_logprobs"][batch["mask"]].numpy(), first)

    report = inspect(outs[dtype])
    mass = np.exp(decoded.astype(np.float64)).sum(axis=1)
    assert report["logprob_dtype"] == dtype
    assert report["captured_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-6)  # Polars decodes in float64


def test_kd_loss_from_uint8_and_bfloat16_within_one_percent_of_float16(runs):
    corpus, teacher, outs = runs
    model, _ = load_model(teacher)
    rows = pq.read_table(corpus).column("inputs").to_pylist()
    with torch.no_grad():
        teacher_logits = torch.cat([model(torch.tensor(r)[None], torch.tensor([len(r)]))[0] for r in rows])
    generator = torch.Generator().manual_seed(0)
    students = {  # a good student, a poor one, and one trained at T=2
        "close": (teacher_logits * 0.8 + torch.randn(teacher_logits.shape, generator=generator), 1.0),
        "far": (torch.randn(teacher_logits.shape, generator=generator) * 2, 1.0),
        "close_T2": (teacher_logits * 0.8 + torch.randn(teacher_logits.shape, generator=generator), 2.0),
    }
    decoded = {}
    for dtype, out in outs.items():
        _, header, ids, raw = _stored(out)
        codec = LogprobCodec.from_header(header)
        decoded[dtype] = (torch.from_numpy(ids).long(), torch.from_numpy(codec.decode_numpy(raw.astype(codec.arrow_type.to_pandas_dtype()))))
    for name, (student, temperature) in students.items():
        losses = {dtype: float(kd_loss(student, ids, values, temperature=temperature)) for dtype, (ids, values) in decoded.items()}
        for dtype in ("bfloat16", "uint8"):
            assert abs(losses[dtype] - losses["float16"]) <= 0.01 * losses["float16"], (name, losses)


def test_uint8_is_smaller_on_disk(runs):
    _, _, outs = runs
    soft = {d: json.loads((o / "manifest.json").read_text())["totals"]["soft_label_bytes"] for d, o in outs.items()}
    assert soft["uint8"] < soft["float16"]


def test_changing_the_dtype_of_an_existing_run_names_the_flag(runs, tmp_path):
    corpus, teacher, outs = runs
    result = run_cli("generate", corpus, "--teacher", teacher, "--out", outs["uint8"], "--id-column", "id", "--top-k", TOP_K,
                     "--rows-per-shard", 40, "--batch-size", 16, "--logprob-dtype", "float16", "--no-progress")
    assert result.code == 1 and "--logprob-dtype" in result.err and len(result.err.strip().splitlines()) == 1


def test_unknown_dtype_is_a_one_line_error(tmp_path):
    corpus = write_parquet(token_table(5, seed=1), tmp_path / "c.parquet")
    result = run_cli("generate", corpus, "--teacher", "softlabels.models:token_gru", "--out", tmp_path / "o",
                     "--logprob-dtype", "int4", "--no-progress")
    assert result.code == 1 and "--logprob-dtype" in result.err and not (tmp_path / "o").exists()
