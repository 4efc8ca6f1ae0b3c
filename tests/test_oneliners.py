"""The README's Polars and DuckDB one-liners: each runs and returns what numpy computes from the shards.

A one-liner is a fenced ```python block preceded by ``<!-- oneliner: NAME -->`` in README.md. Every
block runs, as written, from a directory whose ``out/digits`` is a generated soft-label directory: a
3-teacher ensemble over ragged token sequences, and the digits CNN ensemble (one position per row).
The value of each top-level expression is checked against pyarrow + numpy over the manifest's shards.
Renaming, removing or breaking a one-liner fails here.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DIGITS_TEACHERS, DIGITS_UNLABELED, REPO, run_cli, save_teacher, token_table, write_parquet

MARKER = re.compile(r"<!--\s*oneliner:\s*([\w-]+)\s*-->\s*\n```python\n(.*?)\n```", re.DOTALL)
EXPECTED = {
    "polars-first-screen", "polars-confident", "polars-top1-counts", "polars-positions",
    "duckdb-top1-counts", "duckdb-confident",
}


def readme_oneliners() -> dict[str, str]:
    blocks = MARKER.findall((REPO / "README.md").read_text(encoding="utf-8"))
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names)), f"duplicate one-liner names in README.md: {names}"
    return dict(blocks)


ONELINERS = readme_oneliners()


def run_block(code: str) -> list[object]:
    """Run a README block in a fresh namespace; the values of its top-level expressions, in order."""
    namespace: dict[str, object] = {}
    values = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.Expr):
            values.append(eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace))
        else:
            exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), namespace)
    return values


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Directories each holding ``out/digits``: a ragged token ensemble and the digits ensemble."""
    base = tmp_path_factory.mktemp("oneliners")
    tokens = write_parquet(token_table(17, seed=51), base / "t.parquet")
    digits = write_parquet(pq.read_table(DIGITS_UNLABELED).slice(0, 80), base / "d.parquet")
    lms = [save_teacher("softlabels.models:token_gru", s, base / f"lm{s}.safetensors") for s in (1, 2, 3)]
    made = {}
    for name, corpus, teachers, extra in (
        ("ragged_tokens", tokens, lms, ["--rows-per-shard", 5, "--top-k", 6]),
        ("digits", digits, DIGITS_TEACHERS, ["--rows-per-shard", 30, "--top-k", 4]),
    ):
        root = base / name
        args = ["generate", corpus, "--out", root / "out" / "digits", "--id-column", "id", "--no-progress", *extra]
        for spec in teachers:
            args += ["--teacher", spec]
        assert run_cli(*args).code == 0
        # a shard still being written by another run (in _staging, beside data/) must not be picked up by the README's reads
        (root / "out" / "digits" / "_staging").mkdir(exist_ok=True)
        (root / "out" / "digits" / "_staging" / "shard-000099.parquet.tmp").write_bytes(b"half a shard")
        made[name] = root
    return made


def expected(root: Path) -> dict[str, object]:
    """Independent figures: pyarrow reads the shards the manifest lists, numpy computes."""
    directory = root / "out" / "digits"
    manifest = json.loads((directory / "manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(directory / "data" / s["file"]) for s in manifest["shards"]])
    ids = [np.array(r) for r in table.column("topk_ids").to_pylist()]
    logprobs = [np.array(r, dtype=np.float64) for r in table.column("topk_logprobs").to_pylist()]
    sample_ids = table.column("sample_id").to_pylist()
    confidence = np.array(table.column("confidence").to_pylist(), dtype=np.float32)
    positions = {
        (sid, j): (int(i[j, 0]), float(np.exp(lp[j, 0])))
        for sid, i, lp in zip(sample_ids, ids, logprobs) for j in range(len(i))
    }
    top1 = Counter(int(i[j, 0]) for i in ids for j in range(len(i)))
    for threshold in (0.6, 0.9):  # no value so close to a threshold that float32 vs float64 could differ
        assert np.all(np.abs(confidence.astype(np.float64) - threshold) > 1e-6)
    return {
        "sample_ids": sample_ids,
        "confidence": dict(zip(sample_ids, confidence.astype(np.float64).tolist())),
        "agreement": dict(zip(sample_ids, table.column("agreement").to_pylist())),
        "positions": positions,
        "top1": top1,
        "top1_sorted": sorted(top1.items(), key=lambda item: (-item[1], item[0])),
        "first_position_top1": Counter(int(i[0, 0]) for i in ids),
        "positions_total": manifest["totals"]["positions"],
    }


def check_polars_first_screen(values, want):
    low, counts = values
    rows = low.to_dicts()
    assert {r["sample_id"] for r in rows} == {s for s, c in want["confidence"].items() if c < 0.6}
    for r in rows:
        assert r["confidence"] == pytest.approx(want["confidence"][r["sample_id"]], rel=1e-6)
        assert r["agreement"] == pytest.approx(want["agreement"][r["sample_id"]], rel=1e-6)
    assert dict(zip(counts["top1"].to_list(), counts["count"].to_list())) == want["first_position_top1"]
    assert counts["count"].to_list() == sorted(counts["count"].to_list(), reverse=True)


def check_confident(rows, want):
    """rows: (sample_id, confidence) pairs, for Polars and DuckDB alike."""
    confident = {s: c for s, c in want["confidence"].items() if c > 0.9}
    assert {s for s, _ in rows} == set(confident) and len(rows) == len(confident)
    for sample_id, value in rows:
        assert value == pytest.approx(confident[sample_id], rel=1e-6)
    return len(confident)


def check_polars_confident(values, want):
    (frame,) = values
    assert frame.columns == ["sample_id", "confidence"]
    return check_confident(frame.rows(), want)


def check_polars_top1_counts(values, want):
    (frame,) = values
    assert [(int(a), int(b)) for a, b in frame.rows()] == want["top1_sorted"]
    assert frame["len"].sum() == want["positions_total"]


def check_polars_positions(values, want):
    (frame,) = values
    assert frame.columns == ["sample_id", "position", "top1", "p_top1"]
    assert frame.height == want["positions_total"] == len(want["positions"])
    got = {(s, int(j)): (int(t), float(p)) for s, j, t, p in frame.rows()}
    assert got.keys() == want["positions"].keys()
    for key, (top1, probability) in want["positions"].items():
        assert got[key][0] == top1
        assert got[key][1] == pytest.approx(probability, rel=1e-12)


def check_duckdb_top1_counts(values, want):
    (rows,) = values
    assert [(int(a), int(b)) for a, b in rows] == want["top1_sorted"]


def check_duckdb_confident(values, want):
    (rows,) = values
    check_confident(rows, want)
    assert [c for _, c in rows] == sorted((c for _, c in rows), reverse=True)


CHECKS = {
    "polars-first-screen": check_polars_first_screen,
    "polars-confident": check_polars_confident,
    "polars-top1-counts": check_polars_top1_counts,
    "polars-positions": check_polars_positions,
    "duckdb-top1-counts": check_duckdb_top1_counts,
    "duckdb-confident": check_duckdb_confident,
}


def test_the_readme_holds_every_expected_oneliner():
    assert set(ONELINERS) == EXPECTED == set(CHECKS), (
        "README.md one-liners changed: update EXPECTED and CHECKS in tests/test_oneliners.py"
    )


@pytest.mark.parametrize("root_name", ["ragged_tokens", "digits"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_oneliner_returns_what_numpy_computes(roots, root_name, name, monkeypatch):
    if name.startswith("duckdb"):
        pytest.importorskip("duckdb", minversion="2.0")
    assert name in ONELINERS, f"README.md lost the one-liner {name!r}"
    root = roots[root_name]
    monkeypatch.chdir(root)
    values = run_block(ONELINERS[name])
    CHECKS[name](values, expected(root))


def test_the_fixtures_make_the_filters_and_counts_non_trivial(roots):
    """Guard against a vacuous pass: the confidence filter keeps some rows and drops others, sequences
    are ragged, and more than one class is a top-1."""
    digits = expected(roots["digits"])
    kept = sum(c > 0.9 for c in digits["confidence"].values())
    assert 0 < kept < len(digits["confidence"])
    assert any(c < 0.6 for c in digits["confidence"].values())
    tokens = expected(roots["ragged_tokens"])
    lengths = Counter(sid for sid, _ in tokens["positions"])
    assert len(set(lengths.values())) > 3 and len(tokens["top1"]) > 5
    assert tokens["positions_total"] > len(tokens["sample_ids"])
