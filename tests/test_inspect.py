"""inspect: figures checked against numpy over the shard columns read with pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import classifier_table, read_output, run_cli, save_teacher, token_table, write_parquet


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = write_parquet(classifier_table(23, seed=31), root / "c.parquet")
    tokens = write_parquet(token_table(17, seed=32), root / "t.parquet")
    digits = [save_teacher("softlabels.models:digits_mlp", s, root / f"d{s}.safetensors") for s in (1, 2, 3)]
    lm = save_teacher("softlabels.models:token_gru", 4, root / "lm.safetensors")
    made = {}
    for name, corpus_path, teachers, extra in (
        ("ensemble_single_row_shards", corpus, digits, ["--rows-per-shard", 1, "--top-k", 4]),
        ("one_teacher", corpus, digits[:1], ["--rows-per-shard", 7, "--top-k", 3]),
        ("ragged_tokens", tokens, [lm], ["--rows-per-shard", 5, "--top-k", 6]),
    ):
        args = ["generate", corpus_path, "--out", root / name, "--id-column", "id", "--no-progress", *extra]
        for spec in teachers:
            args += ["--teacher", spec]
        assert run_cli(*args).code == 0
        made[name] = root / name
    return made


@pytest.mark.parametrize("name", ["ensemble_single_row_shards", "one_teacher", "ragged_tokens"])
def test_inspect_figures_equal_an_independent_computation(directories, name):
    directory = directories[name]
    result = run_cli("inspect", directory, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    table = read_output(directory)
    logprobs = [np.array(row, dtype=np.float64) for row in table.column("topk_logprobs").to_pylist()]
    ids = [np.array(row) for row in table.column("topk_ids").to_pylist()]
    mass = np.concatenate([np.exp(r).sum(axis=1) for r in logprobs])
    top1 = np.concatenate([r[:, 0] for r in ids])
    confidence = np.array(table.column("confidence").to_pylist(), dtype=np.float64)
    entropy = np.array(table.column("entropy").to_pylist(), dtype=np.float64)

    assert report["rows"] == table.num_rows and report["positions"] == len(mass)
    assert report["captured_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-9)
    assert report["captured_mass"]["p5"] == pytest.approx(np.percentile(mass, 5), rel=1e-9)
    assert report["confidence"]["p50"] == pytest.approx(np.percentile(confidence, 50), rel=1e-6)
    assert report["entropy"]["p95"] == pytest.approx(np.percentile(entropy, 95), rel=1e-6)
    assert sum(report["confidence"]["histogram"]["counts"]) == table.num_rows
    classes, counts = np.unique(top1, return_counts=True)
    best = sorted(zip(counts.tolist(), classes.tolist()), key=lambda pair: -pair[0])[:10]
    assert [c["positions"] for c in report["top1_classes"]] == [count for count, _ in best]
    if "agreement" in table.column_names:
        agreement = np.array(table.column("agreement").to_pylist(), dtype=np.float64)
        assert report["agreement"]["mean"] == pytest.approx(agreement.mean(), rel=1e-6)
        assert report["agreement"]["unanimous_rows"] == pytest.approx((agreement > 1 - 1e-6).mean())
    else:
        assert "agreement" not in report
    text = run_cli("inspect", directory)
    assert text.code == 0 and "captured mass" in text.out


def test_inspect_refuses_an_unsealed_directory(directories, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(directories["one_teacher"], copy)
    (copy / "manifest.json").unlink()
    result = run_cli("inspect", copy)
    assert result.code == 2 and "manifest" in result.err
