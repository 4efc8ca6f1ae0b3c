"""Directories written by the first release (format ``softlabels.v1``) still verify, inspect and train.

``tests/data/v1`` holds two tiny v1 directories written by softlabels 0.1 (commit 5483ebb) over the
first 37 rows of ``data/digits/test.parquet`` with two digit teachers and ``--rows-per-shard 16``:
one with float16 log-probabilities (the v1 default) and one with uint8 codes, which v1 stored in
the ``topk_logprobs`` column itself. The figures are checked against the shard files read with
pyarrow and decoded with numpy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, run_cli

V1 = REPO / "tests" / "data" / "v1"
DTYPES = ("float16", "uint8")


@pytest.fixture
def v1_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    target = tmp_path / f"v1_{request.param}"
    shutil.copytree(V1 / f"v1_digits_{request.param}", target)
    return target


def decoded_logprobs(directory: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """([N, k] ids, [N, k] log-probs, sample ids) of every position, from the files with numpy."""
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "softlabels.v1"
    table = pa.concat_tables([pq.read_table(directory / entry["file"]) for entry in manifest["shards"]])
    k = manifest["top_k"]
    ids = pc.list_flatten(table.column("topk_ids").combine_chunks()).flatten().to_numpy().reshape(-1, k).astype(np.int64)
    stored = pc.list_flatten(table.column("topk_logprobs").combine_chunks()).flatten().to_numpy().reshape(-1, k)
    if manifest.get("logprob_dtype") == "uint8":
        values = -(stored.astype(np.float64) * manifest["logprob_scale"]) ** 2
    else:
        values = stored.astype(np.float64)
    return ids, values, table.column("sample_id").to_pylist()


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_verifies(v1_dir):
    result = run_cli("verify", v1_dir)
    assert result.code == 0, result.err
    assert "3 shards, 37 rows" in result.out


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_verify_still_catches_corruption(v1_dir):
    shard = v1_dir / "shard-000001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("verify", v1_dir)
    assert result.code == 2 and "shard-000001.parquet" in result.err


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_inspects(v1_dir):
    result = run_cli("inspect", v1_dir, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    ids, logprobs, _ = decoded_logprobs(v1_dir)
    assert report["rows"] == 37 and report["positions"] == len(ids) == 37
    assert report["captured_mass"]["mean"] == pytest.approx(float(np.exp(logprobs).sum(axis=1).mean()), rel=1e-6)
    counts = np.bincount(ids[:, 0], minlength=10)
    assert {c["class"]: c["positions"] for c in report["top1_classes"]} == {c: int(n) for c, n in enumerate(counts) if n}


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_loader_decodes(v1_dir):
    from softlabels import SoftLabelDataset

    ids, logprobs, sample_ids = decoded_logprobs(v1_dir)
    dataset = SoftLabelDataset(v1_dir, batch_size=10, shuffle=False)
    got_ids, got_logprobs, got_samples = [], [], []
    for batch in dataset:
        got_ids.append(batch["topk_ids"][:, 0].numpy())
        got_logprobs.append(batch["topk_logprobs"][:, 0].double().numpy())
        got_samples += batch["sample_id"]
    assert got_samples == sample_ids
    np.testing.assert_array_equal(np.concatenate(got_ids), ids)
    np.testing.assert_allclose(np.concatenate(got_logprobs), logprobs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_trains(v1_dir, tmp_path):
    out = tmp_path / "student"
    result = run_cli("train-student", v1_dir, "--student", "softlabels.models:digits_mlp", "--out", out,
                     "--max-steps", 6, "--batch-size", 8, "--eval", v1_dir)
    assert result.code == 0, result.err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 1 and all(np.isfinite(losses))
    assert any(key.startswith("eval_") for m in metrics for key in m)
    assert (out / "student.safetensors").is_file()


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_v1_select_writes_v2(v1_dir, tmp_path):
    out = tmp_path / "selected"
    result = run_cli("select", v1_dir, "--where", "confidence > 0.5", "--out", out)
    assert result.code == 0, result.err
    assert run_cli("verify", out).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "softlabels.v2"
    _, source_logprobs, samples = decoded_logprobs(v1_dir)
    confidence = pa.concat_tables([pq.read_table(p) for p in sorted(v1_dir.glob("shard-*.parquet"))]).column("confidence").to_numpy()
    keep = confidence > 0.5
    from softlabels import SoftLabelDataset

    got = {}
    for batch in SoftLabelDataset(out, batch_size=64, shuffle=False):
        for sample, values in zip(batch["sample_id"], batch["topk_logprobs"][:, 0].double().numpy()):
            got[sample] = values
    assert sorted(got) == sorted(np.array(samples)[keep].tolist())
    for index in np.flatnonzero(keep):
        np.testing.assert_allclose(got[samples[index]], source_logprobs[index], rtol=1e-6, atol=1e-7)
    shard = pq.read_schema(out / "data" / "shard-000000.parquet")
    column = "topk_logprob_codes" if manifest["logprob_dtype"] == "uint8" else "topk_logprobs"
    assert shard.get_field_index(column) >= 0


@pytest.mark.parametrize("v1_dir", DTYPES, indirect=True)
def test_generate_refuses_a_v1_out(v1_dir, tmp_path):
    before = {p: p.read_bytes() for p in v1_dir.rglob("*") if p.is_file()}
    result = run_cli("generate", REPO / "tests" / "data" / "v1" / "digits_corpus.parquet", "--id-column", "id",
                     "--teacher", f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_0.safetensors",
                     "--out", v1_dir, "--no-progress")
    assert result.code == 1
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "softlabels.v1" in lines[0] and str(v1_dir) in lines[0]
    assert {p: p.read_bytes() for p in v1_dir.rglob("*") if p.is_file()} == before


def test_v1_collate_reads_the_header():
    """A v1 uint8 shard read with pyarrow keeps its header, so ``collate`` decodes the codes right."""
    from softlabels import collate

    directory = V1 / "v1_digits_uint8"
    table = pq.read_table(directory / "shard-000000.parquet")
    ids, logprobs, _ = decoded_logprobs(directory)
    batch = collate(table)
    np.testing.assert_allclose(batch["topk_logprobs"][:, 0].double().numpy(), logprobs[:16], rtol=1e-6, atol=1e-7)
    assert torch.equal(batch["labels"], torch.tensor(table.column("label").to_pylist()))
