"""``softlabels.collate`` as the ``collate_fn`` of a torch DataLoader over an HF ``datasets`` Dataset.

HF datasets drops the shard header (Parquet key-value metadata), so the rows arrive without it:
float log-probabilities collate as they are, and uint8 codes are refused with one clear line unless
the directory's codec is passed. The batches are compared with padding done by hand in numpy from
the shard files read with pyarrow.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, save_teacher, token_table, write_parquet
from softlabels import LogprobCodec, collate
from softlabels.errors import UserError

ROWS = 117
BATCH = 8


@pytest.fixture(scope="module")
def soft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("collate_hf")
    tokens = write_parquet(token_table(ROWS, seed=2), work / "tokens.parquet")
    digits = write_parquet(classifier_table(ROWS, seed=2), work / "digits.parquet")
    teacher = save_teacher("softlabels.models:token_gru", 4, work / "gru.safetensors")
    found = {}
    for name, corpus, teachers, dtype in (("tokens-bfloat16", tokens, [teacher], "bfloat16"),
                                          ("tokens-uint8", tokens, [teacher], "uint8"),
                                          ("digits-uint8", digits, DIGITS_TEACHERS, "uint8")):
        out = work / name
        args = ["generate", corpus, "--id-column", "id", "--out", out, "--logprob-dtype", dtype,
                "--rows-per-shard", 50, "--top-k", 6, "--no-progress"]
        for spec in teachers:
            args += ["--teacher", spec]
        assert run_cli(*args).code == 0
        found[name] = out
    return found


def hf_rows(directory: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    return load_dataset("parquet", data_dir=str(directory / "data"), split="train",
                        cache_dir=str(directory.parent / f"hf-cache-{directory.name}"))


def expected_batches(directory: Path) -> list[dict[str, np.ndarray]]:
    """Batches of BATCH rows in file order, padded by hand, log-probs decoded with numpy."""
    manifest = json.loads((directory / "manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(p) for p in sorted((directory / "data").glob("*.parquet"))])
    column = "topk_logprob_codes" if manifest["logprob_dtype"] == "uint8" else "topk_logprobs"
    batches = []
    for start in range(0, table.num_rows, BATCH):
        rows = table.slice(start, BATCH).to_pylist()
        steps = max(len(row["topk_ids"]) for row in rows)
        k = manifest["top_k"]
        ids = np.zeros((len(rows), steps, k), dtype=np.int64)
        logprobs = np.zeros((len(rows), steps, k), dtype=np.float64)
        mask = np.zeros((len(rows), steps), dtype=bool)
        for i, row in enumerate(rows):
            n = len(row["topk_ids"])
            ids[i, :n] = row["topk_ids"]
            stored = np.asarray(row[column], dtype=np.float64)
            logprobs[i, :n] = -(stored * manifest["logprob_scale"]) ** 2 if column == "topk_logprob_codes" else stored
            mask[i, :n] = True
        batches.append({"ids": ids, "logprobs": logprobs, "mask": mask, "sample_id": [r["sample_id"] for r in rows],
                        "inputs": [r["inputs"] for r in rows]})
    return batches


def assert_batches_match(loader, expected: list[dict[str, np.ndarray]], ragged: bool) -> None:
    got = list(loader)
    assert len(got) == len(expected)
    for batch, want in zip(got, expected):
        assert batch["sample_id"] == want["sample_id"]
        np.testing.assert_array_equal(batch["topk_ids"].numpy(), want["ids"])
        np.testing.assert_array_equal(batch["mask"].numpy(), want["mask"])
        np.testing.assert_allclose(batch["topk_logprobs"].double().numpy(), want["logprobs"], rtol=1e-6, atol=1e-7)
        if ragged:
            lengths = [len(x) for x in want["inputs"]]
            assert batch["lengths"].tolist() == lengths
            for row, tokens in enumerate(want["inputs"]):
                assert batch["inputs"][row, : lengths[row]].tolist() == tokens
        else:
            assert "lengths" not in batch
            np.testing.assert_allclose(batch["inputs"].numpy(), np.asarray(want["inputs"], dtype=np.float32))


def test_ragged_tokens_through_hf_dataloader(soft_dirs, monkeypatch):
    directory = soft_dirs["tokens-bfloat16"]
    rows = hf_rows(directory, monkeypatch)
    loader = DataLoader(rows, batch_size=BATCH, shuffle=False, collate_fn=collate)
    assert_batches_match(loader, expected_batches(directory), ragged=True)


def test_ragged_tokens_with_the_hf_schema(soft_dirs, monkeypatch):
    directory = soft_dirs["tokens-bfloat16"]
    rows = hf_rows(directory, monkeypatch)
    collate_fn = functools.partial(collate, schema=rows.features.arrow_schema)
    assert_batches_match(DataLoader(rows, batch_size=BATCH, collate_fn=collate_fn), expected_batches(directory), ragged=True)


@pytest.mark.parametrize("name", ["tokens-uint8", "digits-uint8"])
def test_uint8_codes_without_header_are_refused(soft_dirs, monkeypatch, name):
    rows = hf_rows(soft_dirs[name], monkeypatch)
    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(rows, batch_size=BATCH, collate_fn=collate)))
    message = str(caught.value)
    assert "\n" not in message and "topk_logprob_codes" in message and "codec" in message


@pytest.mark.parametrize("name", ["tokens-uint8", "digits-uint8"])
def test_uint8_codes_with_the_manifest_codec_decode_exactly(soft_dirs, monkeypatch, name):
    directory = soft_dirs[name]
    rows = hf_rows(directory, monkeypatch)
    codec = LogprobCodec.from_header(json.loads((directory / "manifest.json").read_text()))
    loader = DataLoader(rows, batch_size=BATCH, collate_fn=functools.partial(collate, codec=codec))
    assert_batches_match(loader, expected_batches(directory), ragged=name.startswith("tokens"))


def test_uint8_codes_in_arrow_format_keep_their_field_metadata_or_are_refused(soft_dirs, monkeypatch):
    """``with_format("arrow")`` hands over one-row tables; whatever metadata survives, never a misdecode."""
    directory = soft_dirs["digits-uint8"]
    rows = hf_rows(directory, monkeypatch).with_format("arrow")
    expected = expected_batches(directory)
    loader = DataLoader(rows, batch_size=None, sampler=torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(rows), batch_size=BATCH, drop_last=False), collate_fn=collate)
    try:
        got = list(loader)
    except UserError as exc:
        assert "topk_logprob_codes" in str(exc)
        return
    for batch, want in zip(got, expected):
        np.testing.assert_allclose(batch["topk_logprobs"].double().numpy(), want["logprobs"], rtol=1e-6, atol=1e-7)


def test_codes_that_lost_their_integer_type_are_refused():
    """A v1 uint8 column that reaches collate as plain numbers (header gone) is not taken for log-probs."""
    table = pa.table({"sample_id": ["a"], "topk_ids": [[[1, 2]]], "topk_logprobs": [[[3.0, 40.0]]]})
    with pytest.raises(UserError, match="above 0"):
        collate(table.to_pylist())
