"""The byte-identity promise, both halves (DESIGN section 7).

* Same machine, same thread count: identical bytes. Two runs at the same torch thread count, one in
  this process and one in a fresh process, write byte-identical shards.
* Another CPU or thread count: equal to storage precision. CPU kernels split their sums by thread, so
  float32 teacher outputs can differ in the last bits and a stored bfloat16 value can round to the
  neighbouring step (on an AMD EPYC, digits_mlp at batch 5 writes other bytes at 1 and 2 threads).
  A 1-thread and a 2-thread run are compared value by value:

  - every stored log-probability of one run is within ``tolerance(a, b)`` of the other run's at the
    same position and rank: the codec's documented rounding bound (``LogprobCodec.error_bound``) of
    each of the two stored values, plus ``FLOAT32_EPS`` nats for float32 reordering;
  - the stored class ids are the same, except for a class that one run stores and the other does not,
    which must sit at the other run's cut (its log-probability within that tolerance of the other
    run's smallest stored value): a tie at storage precision;
  - the float32 row statistics (confidence, entropy, agreement) agree to float32 reordering, and the
    pass-through columns, ids, manifest fingerprint, settings and totals are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import (DIGITS_TEACHERS, REPO, assert_equal_to_storage_precision, classifier_table, per_position, read_output, run_cli,
                      save_teacher, token_table, tolerance, write_parquet)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """A classifier corpus with an ensemble (a fresh MLP and a trained CNN), and ragged token sequences with a
    GRU: the MLP and the GRU write other bytes at 1 and 2 threads on some CPUs."""
    root = tmp_path_factory.mktemp("determinism")
    digits = write_parquet(classifier_table(117, seed=23), root / "digits.parquet")
    tokens = write_parquet(token_table(117, seed=8), root / "tokens.parquet")
    ensemble = [save_teacher("softlabels.models:digits_mlp", 4, root / "mlp.safetensors"), DIGITS_TEACHERS[0]]
    gru = [save_teacher("softlabels.models:token_gru", 5, root / "gru.safetensors")]
    return {"digits-ensemble": (digits, ensemble), "tokens-gru": (tokens, gru)}


def generate_args(corpus: Path, teachers: list[str], out: Path, *extra: object) -> list[str]:
    args = ["generate", str(corpus), "--out", str(out), "--id-column", "id", "--rows-per-shard", "13", "--batch-size", "5",
            "--top-k", "4", "--no-progress", *[str(e) for e in extra]]
    for spec in teachers:
        args += ["--teacher", spec]
    return args


def generate_at(threads: int, *args: object) -> None:
    """``softlabels generate ARGS`` in this process on ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_cli(*args)
    finally:
        torch.set_num_threads(before)
    assert result.code == 0, result.err


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


@pytest.mark.parametrize("case", ["digits-ensemble", "tokens-gru"])
def test_same_thread_count_gives_identical_bytes_in_another_process(tmp_path, inputs, case):
    """2 threads here and 2 threads in a fresh process: the same shard bytes and manifest entries."""
    corpus, teachers = inputs[case]
    here, there = tmp_path / "here", tmp_path / "there"
    generate_at(2, *generate_args(corpus, teachers, here))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    child = subprocess.run([sys.executable, "-c", "import sys, torch; assert torch.get_num_threads() == 2; "
                            "from softlabels.cli import main; sys.exit(main(sys.argv[1:]))",
                            *generate_args(corpus, teachers, there)], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert shard_bytes(there) == shard_bytes(here) and len(shard_bytes(here)) == 9
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (here, there)]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


@pytest.mark.parametrize("case", ["digits-ensemble", "tokens-gru"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "uint8"])
def test_other_thread_count_is_equal_to_storage_precision(tmp_path, inputs, case, dtype):
    corpus, teachers = inputs[case]
    runs = {threads: tmp_path / f"threads{threads}" for threads in (1, 2)}
    for threads, out in runs.items():
        generate_at(threads, *generate_args(corpus, teachers, out, "--logprob-dtype", dtype))
    one, two = (read_output(out) for out in runs.values())
    assert_equal_to_storage_precision(one, two)
    manifests = [json.loads((out / "manifest.json").read_text()) for out in runs.values()]
    for key in ("fingerprint", "settings", "teachers", "vocab_size"):
        assert manifests[0][key] == manifests[1][key], key
    assert manifests[0]["totals"]["rows"] == manifests[1]["totals"]["rows"] == 117
    assert manifests[0]["totals"]["positions"] == manifests[1]["totals"]["positions"]


def test_the_comparison_catches_a_value_beyond_precision_and_a_replaced_class(tmp_path, inputs):
    """The comparison itself can fail: one value moved by about 4 bfloat16 steps, or one top-1 class replaced."""
    corpus, teachers = inputs["digits-ensemble"]
    out = tmp_path / "run"
    generate_at(1, *generate_args(corpus, teachers, out))
    table = read_output(out)
    assert assert_equal_to_storage_precision(table, table) == 0

    def replaced(column: str, values: np.ndarray) -> pa.Table:
        lists = table.column(column).combine_chunks()
        inner = lists.flatten()
        rebuilt = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=inner.type.value_type), inner.type.list_size)
        return table.set_column(table.column_names.index(column), column, pa.ListArray.from_arrays(lists.offsets, rebuilt))

    values = per_position(table, "topk_logprobs").copy()
    values[7, 1] = torch.tensor(values[7, 1] * (1 + 2.0**-6)).bfloat16().float().item()
    assert values[7, 1] != per_position(table, "topk_logprobs")[7, 1]
    with pytest.raises(AssertionError, match="storage precision"):
        assert_equal_to_storage_precision(table, replaced("topk_logprobs", values))
    ids = per_position(table, "topk_ids").copy()
    ids[11, 0] = next(c for c in range(10) if c not in ids[11].tolist())  # 4 of 10 classes stored
    with pytest.raises(AssertionError, match="above the cut"):
        assert_equal_to_storage_precision(table, replaced("topk_ids", ids))
