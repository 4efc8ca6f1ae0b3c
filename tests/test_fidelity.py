"""The fidelity report (captured mass, KL(full || stored)) against a dense computation in the test."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, classifier_table, read_output, run_cli, write_parquet
from softlabels.fidelity import Fidelity
from softlabels.models import digits_cnn


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_manifest_fidelity_equals_dense_computation(tmp_path, top_k):
    corpus = write_parquet(classifier_table(117, seed=11), tmp_path / "c.parquet")
    weights = [REPO / "data" / "teachers" / f"digits_cnn_{i}.safetensors" for i in range(2)]
    # float16 storage, as the fidelity report describes it: at k = V bfloat16's rounding alone moves the KL by ~2e-4
    args = ["generate", corpus, "--out", tmp_path / "out", "--id-column", "id", "--top-k", top_k, "--rows-per-shard", 25,
            "--logprob-dtype", "float16", "--no-progress"]
    for path in weights:
        args += ["--teacher", f"softlabels.models:digits_cnn@{path}"]
    assert run_cli(*args).code == 0
    fidelity = json.loads((tmp_path / "out" / "manifest.json").read_text())["fidelity"]

    table = read_output(tmp_path / "out")
    source = pq.read_table(corpus).sort_by("id")
    x = torch.tensor(np.array(source.column("inputs").to_pylist(), dtype=np.float32))
    probabilities = []
    for path in weights:
        model = digits_cnn()
        model.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            probabilities.append(torch.softmax(model.eval()(x).double(), dim=-1))
    p = torch.stack(probabilities).mean(dim=0).numpy()  # [117, 10] full ensemble distribution
    ids = np.array([r[0] for r in table.column("topk_ids").to_pylist()])
    stored = np.array([r[0] for r in table.column("topk_logprobs").to_pylist()], dtype=np.float64)
    rebuilt = np.zeros_like(p)
    tail = np.clip(1.0 - np.exp(stored).sum(axis=1), 1e-12, None)
    if top_k < 10:
        rebuilt[:] = (tail / (10 - top_k))[:, None]
    np.put_along_axis(rebuilt, ids, np.exp(stored), axis=1)
    kl = np.where(p > 0, p * (np.log(p) - np.log(rebuilt)), 0.0).sum(axis=1)
    mass = np.take_along_axis(p, ids, axis=1).sum(axis=1)
    assert fidelity["positions"] == 117
    assert fidelity["captured_mass_mean"] == pytest.approx(mass.mean(), abs=2e-4)
    assert abs(fidelity["captured_mass_p5"] - np.percentile(mass, 5, method="inverted_cdf")) <= 1.01e-3
    assert fidelity["kl_full_vs_stored_mean"] == pytest.approx(kl.mean(), abs=2e-4, rel=2e-2)


def test_fidelity_merges_exactly():
    rng = np.random.default_rng(0)
    masses, kls = rng.random(1000), rng.random(1000)
    whole, parts = Fidelity(), [Fidelity(), Fidelity(), Fidelity()]
    whole.add(masses, kls)
    for part, chunk in zip(parts, np.array_split(np.arange(1000), 3)):
        part.add(masses[chunk], kls[chunk])
    merged = Fidelity()
    for part in parts:
        merged.merge(Fidelity.from_json(json.loads(json.dumps(part.to_json()))))
    assert merged.summary() == pytest.approx(whole.summary())
    assert abs(whole.percentile_mass(0.05) - np.percentile(masses, 5, method="inverted_cdf")) <= 1.01e-3
