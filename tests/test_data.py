"""SoftLabelDataset and collate on directories written by ``softlabels generate`` (DESIGN.md sections 3, 6, 7).

Corpora of awkward sizes: 117 classifier rows (a third of the labels missing) cut into shards of
25; 83 ragged token rows (lengths 1..23, per-position labels, some rows and some positions
unlabelled) cut into shards of 19 with k=13 < V=97; 41 ragged rows of 13-feature frames (no labels),
k=20 < V=37, shards of 13. Expected values are read straight from the shard files with pyarrow.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import (DIGITS_TEACHERS, classifier_table, frame_table, journal_path, run_cli, save_teacher, shard_path,
                      shard_paths, token_table, write_parquet)
from softlabels.data import SoftLabelDataset, collate
from softlabels.errors import VerificationError
from softlabels.losses import IGNORE_INDEX

CLS_ROWS, TOK_ROWS, FRM_ROWS = 117, 83, 41
BATCH = 7

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


# -- fixtures ---------------------------------------------------------------------------------------


def _classifier_corpus(path: Path) -> Path:
    table = classifier_table(CLS_ROWS, seed=21)
    labels = table.column("label").to_numpy()
    missing = np.random.default_rng(22).random(CLS_ROWS) < 0.33
    table = table.set_column(2, "label", pa.array(labels, mask=missing))
    return write_parquet(table, path, row_group_size=40)


def _token_corpus(path: Path) -> Path:
    table = token_table(TOK_ROWS, seed=23)
    rng = np.random.default_rng(24)
    # a quarter of the rows unlabelled (null), and within labelled rows some positions null
    labels = [
        None if rng.random() < 0.25 else [None if rng.random() < 0.15 else int(t) + 1 for t in row]
        for row in table.column("inputs").to_pylist()
    ]
    table = table.append_column("label", pa.array(labels, type=pa.list_(pa.int64())))
    return write_parquet(table, path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    cls = run_cli(
        "generate", _classifier_corpus(root / "cls.parquet"), "--teacher", DIGITS_TEACHERS[0], "--teacher",
        DIGITS_TEACHERS[1], "--out", root / "cls", "--id-column", "id", "--label-column", "label",
        "--rows-per-shard", 25, "--batch-size", 9, "--no-progress",
    )
    assert cls.code == 0, cls.err
    teacher = save_teacher("softlabels.models:token_gru", 3, root / "token_gru.safetensors")
    tok = run_cli(
        "generate", _token_corpus(root / "tok.parquet"), "--teacher", teacher, "--out", root / "tok",
        "--id-column", "id", "--label-column", "label", "--top-k", 13, "--rows-per-shard", 19,
        "--batch-size", 6, "--no-progress",
    )
    assert tok.code == 0, tok.err
    frames = save_teacher("softlabels.models:frame_tagger", 4, root / "frame_tagger.safetensors")
    frm = run_cli(
        "generate", write_parquet(frame_table(FRM_ROWS, seed=25), root / "frm.parquet"), "--teacher", frames,
        "--out", root / "frm", "--id-column", "id", "--rows-per-shard", 13, "--batch-size", 5, "--no-progress",
    )
    assert frm.code == 0, frm.err
    return {"cls": root / "cls", "tok": root / "tok", "frm": root / "frm"}


def _reference(directory: Path) -> dict[str, dict[str, Any]]:
    """sample_id -> that row's values, read from the shard files with pyarrow alone."""
    rows: dict[str, dict[str, Any]] = {}
    for path in shard_paths(directory):
        table = pq.read_table(path)
        for row in table.to_pylist():
            row["shard"] = path.name
            rows[row["sample_id"]] = row
        # to_pylist goes through Python floats; keep the exact stored values (bfloat16 in float32) as numpy too
        logprobs = table.column("topk_logprobs").combine_chunks()
        assert logprobs.type.value_type.value_type == pa.float32()  # the default storage, bfloat16 values
        for i, sid in enumerate(table.column("sample_id").to_pylist()):
            rows[sid]["stored_logprobs"] = logprobs[i].values.flatten().to_numpy(zero_copy_only=False)
    assert rows, f"no shards in {directory}"
    return rows


@pytest.fixture(scope="module")
def refs(dirs) -> dict[str, dict[str, dict[str, Any]]]:
    return {name: _reference(path) for name, path in dirs.items()}


def _loader(ds: SoftLabelDataset, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers)


def _ids(batches: list[dict[str, Any]]) -> list[str]:
    return [sid for batch in batches for sid in batch["sample_id"]]


_FULL: dict[tuple, list[dict[str, Any]]] = {}


def _uninterrupted(directory: Path, workers: int, seed: int, epoch: int, rank: int, world: int) -> list[dict[str, Any]]:
    key = (str(directory), workers, seed, epoch, rank, world)
    if key not in _FULL:
        ds = SoftLabelDataset(directory, batch_size=BATCH, seed=seed, rank=rank, world_size=world)
        ds.set_epoch(epoch)
        _FULL[key] = list(_loader(ds, workers))
    return _FULL[key]


# -- every row exactly once -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cls", "tok"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("seed,epoch", [(0, 0), (3, 1), (11, 4)])
def test_every_row_exactly_once_across_two_ranks(dirs, refs, name, workers, seed, epoch):
    seen: list[str] = []
    for rank in range(2):
        ds = SoftLabelDataset(dirs[name], batch_size=BATCH, seed=seed, rank=rank, world_size=2)
        ds.set_epoch(epoch)
        batches = list(_loader(ds, workers))
        assert len(batches) == ds.num_batches(workers, rank=rank)
        sizes = [len(b["sample_id"]) for b in batches]
        # drop_last=False: every worker's stream is full batches then at most one short one
        assert sum(s < BATCH for s in sizes) <= max(workers, 1)
        assert all(0 < s <= BATCH for s in sizes)
        ids = _ids(batches)
        assert ids, f"rank {rank} got no rows"
        seen += ids
    counts = Counter(seen)
    assert set(counts) == set(refs[name]), "the union over ranks must be every row"
    assert max(counts.values()) == 1, f"rows seen twice: {[s for s, c in counts.items() if c > 1][:5]}"


@pytest.mark.parametrize("workers", [0, 2])
def test_drop_last_yields_only_full_batches_and_no_row_twice(dirs, refs, workers):
    seen: list[str] = []
    for rank in range(2):
        ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=5, rank=rank, world_size=2, drop_last=True)
        batches = list(_loader(ds, workers))
        assert len(batches) == ds.num_batches(workers, rank=rank)
        assert all(len(b["sample_id"]) == BATCH for b in batches)
        seen += _ids(batches)
    assert len(seen) == len(set(seen)) and set(seen) <= set(refs["cls"])
    # at most one short batch per (rank, worker) is dropped
    assert len(refs["cls"]) - len(seen) < 2 * max(workers, 1) * BATCH


def test_order_is_a_function_of_seed_and_epoch(dirs, refs):
    def order(seed: int, epoch: int, workers: int = 0) -> list[str]:
        ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=seed, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return _ids(list(_loader(ds, workers)))

    first = order(5, 0)
    assert sorted(first) == sorted(refs["cls"])
    assert order(5, 0) == first, "same (seed, epoch) must give the same order"
    assert order(5, 1) != first, "another epoch must give another order"
    assert sorted(order(5, 1)) == sorted(first)
    assert order(6, 0) != first, "another seed must give another order"
    assert order(5, 2, workers=2) == order(5, 2, workers=2)
    # the same dataset object, epoch after epoch, follows the same per-epoch orders
    ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=5, rank=0, world_size=1)
    assert _ids(list(ds)) == first
    ds.set_epoch(1)
    assert _ids(list(ds)) == order(5, 1)
    # and shuffling really moves rows away from the file order
    assert first != sorted(first)


def test_unshuffled_order_is_the_shard_order(dirs, refs):
    ds = SoftLabelDataset(dirs["tok"], batch_size=BATCH, shuffle=False, rank=0, world_size=1)
    expected = [sid for path in shard_paths(dirs["tok"]) for sid in pq.read_table(path).column("sample_id").to_pylist()]
    assert _ids(list(ds)) == expected


# -- mid-epoch resume -------------------------------------------------------------------------------


def _assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert _ids(got) == _ids(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def _resumed(directory: Path, workers: int, seed: int, epoch: int, rank: int, world: int, cut: int) -> list[dict[str, Any]]:
    """Consume ``cut`` batches as the trainer does, save the state, resume on a NEW dataset object."""
    ds = SoftLabelDataset(directory, batch_size=BATCH, seed=seed, rank=rank, world_size=world)
    ds.set_epoch(epoch)
    head: list[dict[str, Any]] = []
    iterator = iter(_loader(ds, workers))
    for _ in range(cut):
        batch = next(iterator)
        ds.record_consumed(batch)
        head.append(batch)
    state = json.loads(json.dumps(ds.state_dict()))  # the trainer stores it as JSON
    del iterator
    fresh = SoftLabelDataset(directory, batch_size=BATCH, seed=seed, rank=rank, world_size=world)
    fresh.load_state_dict(state)
    return head + list(_loader(fresh, workers))


@pytest.mark.parametrize("name", ["cls", "tok"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", ["one", "half", "all-but-one"])
def test_resume_mid_epoch_equals_uninterrupted(dirs, name, workers, cut):
    full = _uninterrupted(dirs[name], workers, seed=1, epoch=0, rank=0, world=1)
    n = {"one": 1, "half": len(full) // 2, "all-but-one": len(full) - 1}[cut]
    _assert_same_batches(_resumed(dirs[name], workers, 1, 0, 0, 1, n), full)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", ["none", "odd", "end"])
def test_resume_on_rank_one_of_two_in_a_later_epoch(dirs, workers, cut):
    full = _uninterrupted(dirs["tok"], workers, seed=9, epoch=2, rank=1, world=2)
    n = {"none": 0, "odd": len(full) // 2 | 1, "end": len(full)}[cut]
    _assert_same_batches(_resumed(dirs["tok"], workers, 9, 2, 1, 2, n), full)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_twice_equals_uninterrupted(dirs, workers):
    """Interrupted at an odd batch, resumed, interrupted again at an even one, resumed again."""
    full = _uninterrupted(dirs["cls"], workers, seed=1, epoch=0, rank=0, world=1)
    got: list[dict[str, Any]] = []
    state = None
    for cut in (3, 4, None):
        ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=1, rank=0, world_size=1)
        if state is not None:
            ds.load_state_dict(state)
        iterator = iter(_loader(ds, workers))
        for batch in iterator if cut is None else (next(iterator) for _ in range(cut)):
            ds.mark_consumed(batch)  # the first release's name for record_consumed, kept as an alias
            got.append(batch)
        state = json.loads(json.dumps(ds.state_dict()))
        del iterator
    _assert_same_batches(got, full)


@pytest.mark.parametrize("cut", [1, 6, 9])
def test_resume_in_process_needs_no_mark_consumed(dirs, cut):
    """Iterating the dataset itself (no workers), the dataset counts what it yielded."""
    full = _uninterrupted(dirs["tok"], 0, seed=1, epoch=0, rank=0, world=1)
    ds = SoftLabelDataset(dirs["tok"], batch_size=BATCH, seed=1, rank=0, world_size=1)
    iterator = iter(ds)
    head = [next(iterator) for _ in range(cut)]
    state = ds.state_dict()
    assert state["batches"] == cut
    fresh = SoftLabelDataset(dirs["tok"], batch_size=BATCH, seed=1, rank=0, world_size=1)
    fresh.load_state_dict(state)
    _assert_same_batches(head + list(fresh), full)


def test_resume_refuses_another_seed_or_world_size(dirs):
    ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=1, rank=0, world_size=1)
    state = ds.state_dict()
    with pytest.raises(ValueError):
        SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=2, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError):
        SoftLabelDataset(dirs["cls"], batch_size=BATCH, seed=1, rank=0, world_size=2).load_state_dict(state)


# -- collate: tensors equal the shard values ---------------------------------------------------------


def _check_batch(batch: dict[str, Any], ref: dict[str, dict[str, Any]], k: int, labels: str | None) -> None:
    """labels: None (no label column), "row" (one per row) or "position" (a list per row)."""
    rows = len(batch["sample_id"])
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_logprobs"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool
    steps = max(len(ref[sid]["topk_ids"]) for sid in batch["sample_id"])
    assert batch["topk_ids"].shape == (rows, steps, k) == batch["topk_logprobs"].shape
    assert batch["mask"].shape == (rows, steps)
    if labels is None:
        assert "labels" not in batch
    else:
        assert batch["labels"].dtype == torch.int64
    for b, sid in enumerate(batch["sample_id"]):
        row = ref[sid]
        n = len(row["topk_ids"])
        assert batch["mask"][b].tolist() == [True] * n + [False] * (steps - n)
        assert batch["topk_ids"][b, :n].tolist() == row["topk_ids"]
        stored = torch.from_numpy(row["stored_logprobs"].astype(np.float32)).reshape(n, k)
        assert torch.equal(batch["topk_logprobs"][b, :n], stored)
        if labels == "position":
            label = [IGNORE_INDEX if v is None else v for v in row["label"] or []]
            width = batch["labels"].shape[1]
            assert batch["labels"][b].tolist() == label + [IGNORE_INDEX] * (width - len(label))
        elif labels == "row":
            assert batch["labels"][b].item() == (IGNORE_INDEX if row["label"] is None else row["label"])
        if "lengths" in batch:  # sequences: one position per token or frame
            assert batch["lengths"].dtype == torch.int64
            assert batch["lengths"][b].item() == len(row["inputs"]) == n
            want = torch.tensor(row["inputs"], dtype=batch["inputs"].dtype)
            assert torch.equal(batch["inputs"][b, :n], want)
            assert batch["inputs"].shape[:2] == (rows, steps)
        else:
            assert batch["inputs"].dtype == torch.float32
            assert torch.equal(batch["inputs"][b], torch.tensor(row["inputs"], dtype=torch.float32))


@pytest.mark.parametrize("name,k,labels,input_dtype", [
    ("cls", 10, "row", torch.float32), ("tok", 13, "position", torch.int64), ("frm", 20, None, torch.float32),
])
def test_batches_hold_the_shard_values(dirs, refs, name, k, labels, input_dtype):
    ds = SoftLabelDataset(dirs[name], batch_size=BATCH, seed=4, rank=0, world_size=1)
    batches = list(ds)
    assert sorted(_ids(batches)) == sorted(refs[name])
    for batch in batches:
        assert batch["inputs"].dtype == input_dtype
        _check_batch(batch, refs[name], k, labels)
    if name != "cls":
        assert any(batch["mask"].sum(1).unique().numel() > 1 for batch in batches), "no ragged batch"
        assert all(batch["inputs"].ndim == (3 if name == "frm" else 2) for batch in batches)
    if labels:
        labelled = [s for s, row in refs[name].items() if row["label"] is not None]
        assert 0 < len(labelled) < len(refs[name]), "the fixture must mix labelled and unlabelled rows"


def test_collate_of_a_raw_shard_table(dirs, refs):
    path = shard_paths(dirs["tok"])[2]
    table = pq.read_table(path)
    batch = collate(table, "inputs", "label")
    assert batch["sample_id"] == table.column("sample_id").to_pylist()
    _check_batch(batch, refs["tok"], 13, "position")
    bare = collate(table.slice(3, 5), None, None)
    assert "labels" not in bare and "inputs" not in bare and "lengths" not in bare
    assert torch.equal(bare["topk_ids"], batch["topk_ids"][3:8, : bare["topk_ids"].shape[1]])
    # with_inputs=False drops the input column from the loader's batches
    ds = SoftLabelDataset(dirs["cls"], batch_size=BATCH, rank=0, world_size=1, with_inputs=False)
    first = next(iter(ds))
    assert "inputs" not in first and "labels" in first


# -- corruption -------------------------------------------------------------------------------------


def _copy(dirs: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dirs["cls"], target)
    return target


def _flip_in_logprobs_data_page(path: Path) -> None:
    """Flip one byte of the last topk_logprobs data page where only the page CRC can see it.

    The position is the first one in the data page whose flipped file still reads, in full and
    with as many rows, without checksum verification, into different values: silent corruption
    unless the reader checks page CRCs."""
    data = path.read_bytes()
    metadata = pq.read_metadata(path)
    group = metadata.row_group(metadata.num_row_groups - 1)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.startswith("topk_logprobs"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    original = pq.read_table(pa.BufferReader(data))
    for position in range(chunk.data_page_offset, start + chunk.total_compressed_size):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        try:
            decoded = pq.read_table(pa.BufferReader(bytes(flipped)), page_checksum_verification=False)
            decoded.validate(full=True)
        except (pa.ArrowException, OSError):
            continue
        if decoded.num_rows == original.num_rows and not decoded.equals(original):
            path.write_bytes(bytes(flipped))
            return
    raise AssertionError(f"{path.name}: no byte of the data page flips silently; cannot build this corruption")


@pytest.mark.parametrize("verify_sha256", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_byte_fails_the_loader_naming_the_file(dirs, tmp_path, verify_sha256, workers):
    directory = _copy(dirs, tmp_path)
    victim = shard_path(directory, 2)
    size = victim.stat().st_size
    _flip_in_logprobs_data_page(victim)
    assert victim.stat().st_size == size
    ds = SoftLabelDataset(directory, batch_size=BATCH, rank=0, world_size=1, verify_sha256=verify_sha256)
    iterator = iter(_loader(ds, workers))
    try:
        for _ in iterator:
            pass
    except VerificationError as exc:
        message = str(exc)
        # torch's re-raise leaves the exception, its traceback and the loader iterator in a reference
        # cycle; break it so the iterator shuts its workers down now, not in a later gc pass (where
        # torch's shutdown waits out a 5 s join timeout)
        exc.__traceback__ = None
    else:
        pytest.fail("a flipped byte in a data page was read silently")
    del iterator
    assert "shard-000002.parquet" in message


@pytest.mark.parametrize("how", ["truncated", "truncated-then-zero-padded"])
@pytest.mark.parametrize("verify_sha256", [True, False])
def test_truncated_shard_fails_at_construction(dirs, tmp_path, how, verify_sha256):
    directory = _copy(dirs, tmp_path)
    victim = shard_path(directory, 1)
    data = victim.read_bytes()
    half = data[: len(data) // 2]
    victim.write_bytes(half if how == "truncated" else half + bytes(len(data) - len(half)))
    with pytest.raises(VerificationError, match="shard-000001.parquet"):
        SoftLabelDataset(directory, batch_size=BATCH, verify_sha256=verify_sha256, rank=0, world_size=1)


def test_unsealed_directory_is_refused_unless_allow_partial(dirs, refs, tmp_path):
    directory = _copy(dirs, tmp_path)
    (directory / "manifest.json").unlink()
    with pytest.raises(VerificationError, match="manifest"):
        SoftLabelDataset(directory, batch_size=BATCH, rank=0, world_size=1)
    ds = SoftLabelDataset(directory, batch_size=BATCH, rank=0, world_size=1, allow_partial=True)
    assert sorted(_ids(list(ds))) == sorted(refs["cls"])

    # a crash mid-run: shard 3 renamed into place but never journalled, shard 4 never written, a .tmp left over
    journal = journal_path(directory)
    kept = [line for line in journal.read_text().splitlines() if not any(f"shard-00000{i}" in line for i in (3, 4))]
    journal.write_text("\n".join(kept) + "\n")
    (directory / "_staging").mkdir(exist_ok=True)
    shard_path(directory, 4).rename(directory / "_staging" / "shard-000004.parquet.tmp")
    with pytest.raises(VerificationError):
        SoftLabelDataset(directory, batch_size=BATCH, rank=0, world_size=1)
    for workers in (0, 2):
        ds = SoftLabelDataset(directory, batch_size=BATCH, rank=0, world_size=1, allow_partial=True)
        got = _ids(list(_loader(ds, workers)))
        want = [s for s, row in refs["cls"].items() if row["shard"] in {f"shard-00000{i}.parquet" for i in (0, 1, 2)}]
        assert sorted(got) == sorted(want) and len(got) == 75


# -- num_batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cls", "tok"])
@pytest.mark.parametrize("workers,drop_last,batch_size", [(0, False, 10), (1, True, 7), (3, False, 7), (3, True, 4)])
def test_num_batches_equals_what_is_yielded(dirs, name, workers, drop_last, batch_size):
    for rank in range(2):
        ds = SoftLabelDataset(dirs[name], batch_size=batch_size, seed=2, rank=rank, world_size=2, drop_last=drop_last)
        ds.set_epoch(1)
        got = sum(1 for _ in _loader(ds, workers))
        assert ds.num_batches(workers, rank=rank) == got
        assert ds.num_batches(workers, rank=rank, epoch=1) == got
        other = SoftLabelDataset(dirs[name], batch_size=batch_size, seed=2, rank=0, world_size=2, drop_last=drop_last)
        assert other.num_batches(workers, rank=rank, epoch=1) == got


@pytest.mark.parametrize("name", ["cls", "tok", "frm"])
def test_an_epoch_leaves_no_reference_cycle_behind(dirs, name):
    """Each window's rows are freed by reference counting when the epoch moves on: no decoder holds its
    owner (a cycle would keep every window's numpy blocks until a garbage collection, and the process
    would grow by a window per epoch; it did, by about 60 MB per epoch of 512,000 positions)."""
    import gc

    from softlabels.data.collation import ShardRows

    dataset = SoftLabelDataset(dirs[name], batch_size=7, shuffle=True, seed=3)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        batches = sum(1 for _ in dataset)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, ShardRows) or type(o).__name__.endswith("Rows")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert batches > 1 and cyclic == []
