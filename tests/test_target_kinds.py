"""A third target kind is one module plus its registration (``softlabels.targets``).

``ArgmaxOnly`` below is that module, written here and nowhere in softlabels: per position the
ensemble's most probable class id. Registered, it runs through generate, verify, inspect, the loader
(SoftLabelDataset and collate) and train's per-position loss, and each stored or served value is
compared with a direct forward of the teacher outside softlabels:

* the stored ids of every row equal the argmax of the teacher's logits, computed here from the
  model's weights (a classifier and ragged token sequences, awkward sizes);
* verify accepts the run, and refuses it when one of the kind's manifest fields is edited;
* inspect's top-1 classes are the counts of those argmax ids; its page says what the kind stores;
* the loader's batches hold each row's argmax ids at its valid positions, masked beyond;
* ``stored_kd_per_position`` is the kind's loss, -log softmax(z / T) at the stored id.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, save_teacher, shard_paths, token_table, write_parquet
from softlabels import models
from softlabels.codec import LogprobCodec
from softlabels.data import SoftLabelDataset, collate
from softlabels.fidelity import Fidelity
from softlabels.inputs import ColumnBlock
from softlabels.schema import id_type
from softlabels.targets import HostTargets, register, unregister
from softlabels.targets.topk import ensemble_logprobs, row_mean, usable_positions
from softlabels.train import stored_kd_per_position

COLUMN = "argmax_id"


class ArgmaxBatch:
    def __init__(self, log_p: torch.Tensor, usable: torch.Tensor) -> None:
        self.log_p, self.usable = log_p, usable

    def of_rows(self, keep: torch.Tensor, positions_per_row: torch.Tensor) -> "ArgmaxBatch":
        kept = keep[torch.repeat_interleave(torch.arange(len(positions_per_row)), positions_per_row)]
        return ArgmaxBatch(self.log_p[kept], self.usable[kept])

    def to_host(self, sample_ids: Sequence[str], positions_per_row: torch.Tensor, fidelity: Fidelity) -> HostTargets:
        best = self.log_p.max(dim=-1)
        entropy = -(self.log_p.exp() * self.log_p).nansum(dim=-1)
        fidelity.add(best.values.exp().numpy(), np.zeros(len(best.values)))
        return HostTargets(best.indices.numpy(), row_mean(best.values.exp(), positions_per_row).numpy(),
                           row_mean(entropy, positions_per_row).numpy(), None)


class ArgmaxRows:
    def __init__(self, table: pa.Table, place: Callable[[np.ndarray], Any]) -> None:
        self.ids, self.place = ColumnBlock.from_arrow(table.column(COLUMN), COLUMN), place

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        ids, lengths = self.ids.gather(rows, 0, np.int64)  # every row is a list of positions: [B, T] and [B]
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {COLUMN: torch.from_numpy(ids), "mask": torch.from_numpy(mask)}


class ArgmaxOnly:
    """Per position the (ensemble) argmax class; loss: cross-entropy of the student at T against it."""

    name = "argmax"
    manifest_keys: tuple[str, ...] = ()
    size_key = None
    batch_key = COLUMN
    id_column = COLUMN
    soft_column_names = (COLUMN,)
    inspect_figures: tuple[str, ...] = ()
    logprob_column_names: tuple[str, ...] = ()

    def prepare(self, config: Any, vocab_size: int) -> None:
        pass

    def settings(self, config: Any) -> dict[str, Any]:
        return {"targets": self.name}

    def header(self, config: Any) -> dict[str, Any]:
        return {"targets": self.name}

    def fields(self, vocab_size: int, header: dict[str, Any], codec: LogprobCodec) -> list[pa.Field]:
        return [pa.field(COLUMN, pa.list_(id_type(vocab_size)))]

    def columns(self, header: dict[str, Any], codec: LogprobCodec) -> tuple[str, None]:
        return COLUMN, None

    def compute(self, member_logits: list[torch.Tensor], positions_per_row: torch.Tensor, run: Any) -> ArgmaxBatch:
        usable = torch.stack([usable_positions(flat) for flat in member_logits]).all(dim=0)
        log_p, _ = ensemble_logprobs(member_logits, run.config.ensemble)
        return ArgmaxBatch(log_p, usable)

    def join(self, parts: list[Any], header: dict[str, Any]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def arrays(self, data: np.ndarray, positions: np.ndarray, vocab_size: int, codec: LogprobCodec, header: dict[str, Any]) -> list[pa.Array]:
        offsets = np.concatenate([[0], np.cumsum(positions)]).astype(np.int32)
        return [pa.ListArray.from_arrays(pa.array(offsets), pa.array(data, type=id_type(vocab_size)))]

    def fidelity_summary(self, fidelity: Fidelity) -> dict[str, float]:
        return {"positions": fidelity.positions, "top1_mass_mean": fidelity.mass_sum / max(fidelity.positions, 1)}

    def describe_fidelity(self, soft_per_position: float, fidelity: dict[str, float]) -> str:
        return f"({soft_per_position:.1f} for argmax ids); top-1 mass mean {fidelity['top1_mass_mean']:.4f}"

    def read_columns(self, header: dict[str, Any], codec: LogprobCodec) -> list[str]:
        return [COLUMN]

    def codec_without_header(self, schema: pa.Schema) -> LogprobCodec:
        return LogprobCodec()

    def row_options(self, schema: pa.Schema, header: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def rows(self, table: pa.Table, codec: LogprobCodec, options: dict[str, Any], place: Callable[[np.ndarray], Any]) -> ArgmaxRows:
        return ArgmaxRows(table, place)

    def loss_per_position(self, logits: torch.Tensor, pick: Callable[[str], torch.Tensor], batch: dict[str, Any],
                          temperature: float, tail: str) -> torch.Tensor:
        log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -log_q.gather(-1, pick(COLUMN)[..., None]).squeeze(-1)

    def teacher_top1(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch[COLUMN]

    def bias_warning(self, temperature: float, header: dict[str, Any]) -> str | None:
        return None

    def inspect(self, scan: Any, manifest: dict[str, Any], codec: LogprobCodec) -> tuple[dict[str, Any], Any]:
        import polars as pl

        return {}, scan.select(pl.col(COLUMN).explode().alias("top1")).collect()

    def inspect_lines(self, report: dict[str, Any]) -> tuple[str, list[str], str]:
        return "the argmax id", [], "most frequent argmax classes"

    def report_fields(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {}


@pytest.fixture(scope="module", autouse=True)
def argmax_kind():
    register(ArgmaxOnly())
    yield
    unregister("argmax")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """An argmax run over 23 classifier rows (a digits CNN) and 19 ragged token rows (a GRU), and the
    argmax ids a direct forward of each teacher gives, by sample id."""
    root = tmp_path_factory.mktemp("argmax")
    digits = classifier_table(23, seed=5)
    tokens = token_table(19, seed=6)
    gru = save_teacher("softlabels.models:token_gru", 9, root / "gru.safetensors")
    cases = {"digits": (digits, DIGITS_TEACHERS[0]), "tokens": (tokens, gru)}
    made = {}
    for name, (table, spec) in cases.items():
        corpus = write_parquet(table, root / f"{name}.parquet")
        out = root / f"{name}-out"
        result = run_cli("generate", corpus, "--teacher", spec, "--targets", "argmax", "--out", out, "--id-column", "id",
                         "--rows-per-shard", "7", "--batch-size", "4", "--no-progress")
        assert result.code == 0, result.err
        made[name] = (out, direct_argmax(name, table, spec))
    return made


def direct_argmax(name: str, table: pa.Table, spec: str) -> dict[str, np.ndarray]:
    """{sample id: int64 [positions] argmax of the teacher's logits}, from the weights file, not softlabels' loader."""
    factory, weights = spec.split("@")
    model = getattr(models, factory.split(":")[1])()
    model.load_state_dict(load_file(weights))
    model.eval()
    ids = table.column("id").to_pylist()
    with torch.no_grad():
        if name == "digits":
            x = torch.tensor(np.stack(table.column("inputs").to_pylist()), dtype=torch.float32)
            return {i: np.array([int(a)]) for i, a in zip(ids, model(x).argmax(dim=-1))}
        out = {}
        for sample_id, row in zip(ids, table.column("inputs").to_pylist()):
            x = torch.tensor([row], dtype=torch.int64)
            out[sample_id] = model(x, torch.tensor([len(row)])).argmax(dim=-1)[0].numpy()
        return out


@pytest.mark.parametrize("name", ["digits", "tokens"])
def test_generate_stores_the_teachers_argmax(runs, name):
    out, expected = runs[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"] == "argmax" and manifest["totals"]["rows"] == len(expected)
    assert manifest["fidelity"]["positions"] == sum(len(v) for v in expected.values())
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths(out)])
    assert len(shard_paths(out)) == -(-len(expected) // 7)
    assert not {"topk_ids", "sample_ids"} & set(table.column_names)
    for sample_id, stored in zip(table.column("sample_id").to_pylist(), table.column(COLUMN).to_pylist()):
        assert stored == expected[sample_id].tolist(), sample_id


@pytest.mark.parametrize("name", ["digits", "tokens"])
def test_verify_accepts_the_run_and_catches_an_edited_shard(runs, name, tmp_path):
    out, _ = runs[name]
    assert run_cli("verify", out).code == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = shard_paths(copy)[0]
    table = pq.read_table(shard)
    ids = table.column(COLUMN).to_pylist()
    ids[0] = [(v + 1) % 10 for v in ids[0]]
    edited = table.set_column(table.schema.get_field_index(COLUMN), table.schema.field(COLUMN), pa.array(ids, table.schema.field(COLUMN).type))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), shard)
    result = run_cli("verify", copy)
    assert result.code == 2 and shard.name in result.err


@pytest.mark.parametrize("name", ["digits", "tokens"])
def test_inspect_counts_the_argmax_classes(runs, name):
    out, expected = runs[name]
    result = run_cli("inspect", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["targets"] == "argmax"
    counts = Counter(int(v) for values in expected.values() for v in values)
    shown = {c["class"]: c["positions"] for c in report["top1_classes"]}
    assert shown == dict(counts.most_common(len(shown)))  # ties may cut either way at the tail; the counts agree
    assert all(shown[c] == counts[c] for c in shown)
    page = run_cli("inspect", out)
    assert page.code == 0 and "the argmax id of" in page.out and "most frequent argmax classes" in page.out


@pytest.mark.parametrize("name", ["digits", "tokens"])
def test_the_loader_serves_the_argmax_ids(runs, name):
    out, expected = runs[name]
    dataset = SoftLabelDataset(out, batch_size=5, shuffle=True, seed=3)
    seen = set()
    for batch in dataset:
        for row, sample_id in enumerate(batch["sample_id"]):
            want = expected[sample_id]
            assert batch["mask"][row].sum() == len(want)
            assert batch[COLUMN][row, : len(want)].tolist() == want.tolist()
            seen.add(sample_id)
    assert seen == set(expected)
    rows = pa.concat_tables([pq.read_table(p) for p in shard_paths(out)])
    batch = collate(rows)
    for row, sample_id in enumerate(batch["sample_id"]):
        assert batch[COLUMN][row][batch["mask"][row]].tolist() == expected[sample_id].tolist()


def test_train_loss_is_the_kinds_own(runs):
    out, _ = runs["tokens"]
    batch = next(iter(SoftLabelDataset(out, batch_size=6)))
    torch.manual_seed(0)
    logits = torch.randn(*batch["mask"].shape, 97)
    per_position = stored_kd_per_position(logits[batch["mask"]], batch, 2.0, "bucket", batch["mask"])
    ids = batch[COLUMN][batch["mask"]]
    direct = -torch.log_softmax(logits[batch["mask"]] / 2.0, dim=-1)[torch.arange(len(ids)), ids]
    torch.testing.assert_close(per_position, direct)


def test_an_unknown_kind_is_one_line():
    result = run_cli("generate", "nowhere.parquet", "--teacher", DIGITS_TEACHERS[0], "--targets", "features", "--out", "x")
    assert result.code == 1 and "--targets must be one of" in result.err and "argmax" in result.err
