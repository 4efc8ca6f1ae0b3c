"""generate behaviours not covered elsewhere: masked (-inf) classes are legitimate outputs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from conftest import classifier_table, read_output, run_cli, save_teacher, write_parquet


def test_minus_infinity_logits_are_masked_classes_not_errors(tmp_path):
    corpus = write_parquet(classifier_table(31, seed=4), tmp_path / "c.parquet")
    spec = save_teacher("fixture_teachers:masked_classifier", 0, tmp_path / "m.safetensors")
    result = run_cli("generate", corpus, "--teacher", spec, "--out", tmp_path / "out", "--id-column", "id",
                     "--top-k", 10, "--no-progress")
    assert result.code == 0, result.err
    table = read_output(tmp_path / "out")
    ids = np.stack([np.asarray(r) for r in table.column("topk_ids").combine_chunks().flatten().to_pylist()])
    logprobs = np.stack([np.asarray(r, dtype=np.float32) for r in table.column("topk_logprobs").combine_chunks().flatten().to_pylist()])
    # the two masked classes have probability 0: they come last with the fp16 floor as log-probability
    assert set(ids[:, -2:].ravel()) == {1, 6}
    assert np.all(logprobs[:, -2:] == np.float32(np.finfo(np.float16).min))
    assert np.allclose(np.exp(logprobs[:, :-2].astype(np.float64)).sum(axis=1), 1.0, atol=5e-3)
