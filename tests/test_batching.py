"""softlabels.batching: batches by length cover every row once within the cap, and cut padding."""

from __future__ import annotations

import numpy as np
import pytest

from softlabels.batching import corpus_order_batches, length_batches, padding_waste


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_once_within_the_cap(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(0, 3_000, size=257)] + [9_001]  # one row longer than the cap
    cap, max_rows = 8_000, 7
    batches = length_batches(lengths, cap, max_rows)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= max_rows
        longest = max(max(1, lengths[i]) for i in batch)
        assert len(batch) * longest <= cap or len(batch) == 1
    assert [len(lengths) - 1] in batches  # the oversized row alone


def test_greedy_packing_by_hand():
    lengths = [5, 9, 2, 9, 4, 0]
    # longest first, ties in corpus order: 1 (9), 3 (9), 0 (5), 4 (4), 2 (2), 5 (0); cap 19 fits two 9s
    # (18), then 5, 4, 2 (3 x 5 = 15; a fourth row would make 20), then the empty row
    assert length_batches(lengths, 19) == [[1, 3], [0, 4, 2], [5]]
    assert length_batches(lengths, 20) == [[1, 3], [0, 4, 2, 5]]
    assert length_batches(lengths, 20, max_rows=2) == [[1, 3], [0, 4], [2, 5]]
    assert corpus_order_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert padding_waste(lengths, [[1, 3], [0, 4, 2], [5]]) == pytest.approx(1 - 29 / (18 + 15 + 0))
    with pytest.raises(ValueError):
        length_batches(lengths, 0)


def test_utterances_of_half_a_second_to_twenty_waste_little_padding_by_length():
    """A realistic mix (0.5 to 20 s, more short than long), 16 kHz samples, capped at 60 s of audio."""
    rng = np.random.default_rng(4)
    seconds = np.clip(rng.lognormal(mean=1.3, sigma=0.8, size=1_013), 0.5, 20.0)
    lengths = [int(s * 16_000) for s in seconds]
    cap = 60 * 16_000
    by_length = padding_waste(lengths, length_batches(lengths, cap))
    in_order = padding_waste(lengths, corpus_order_batches(len(lengths), 8))
    assert by_length <= 0.10 < in_order


def test_columns_kind_batches_ragged_rows_by_length_and_gives_back_corpus_order():
    """``--batch-positions``: the unit's rows come out longest first in batches within the cap, and the
    order the shard is written in puts every row back in its corpus place."""
    import pyarrow as pa

    from conftest import token_table
    from softlabels.inputs import ColumnsKind

    table = token_table(61, seed=3)
    kind = ColumnsKind("inputs", batch_size=6, batch_positions=50)
    read = kind.read_unit(None, None, table)
    spans, order = kind.spans(read)
    lengths = [len(row) for row in read.column("inputs").to_pylist()]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    assert sum(size for _, size in spans) == table.num_rows
    for begin, size in spans:
        assert size <= 6 and (size * lengths[begin] <= 50 or size == 1)
    stored = kind.stored(read)
    assert stored.column_names == table.column_names  # the batch columns are never stored
    restored = stored.take(pa.array(np.argsort(order, kind="stable")))
    assert restored.equals(table)
    corpus_order = ColumnsKind("inputs", batch_size=6)
    assert corpus_order.spans(corpus_order.read_unit(None, None, table))[0][:2] == [(0, 6), (6, 6)]


def test_batch_positions_on_rows_of_one_size_or_audio_is_one_line(tmp_path):
    import pyarrow as pa

    from conftest import run_cli, write_parquet

    corpus = write_parquet(pa.table({"id": ["a", "b"], "inputs": pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32(), 2))}),
                           tmp_path / "c.parquet")
    result = run_cli("generate", corpus, "--teacher", "softlabels.models:digits_mlp", "--id-column", "id", "--batch-positions", 9,
                     "--out", tmp_path / "out", "--no-progress")
    assert result.code == 1 and "--batch-positions" in result.err and "'inputs'" in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    result = run_cli("generate", corpus, "--teacher", "softlabels.models:digits_mlp", "--id-column", "id", "--audio-column", "inputs",
                     "--batch-positions", 9, "--out", tmp_path / "out2", "--no-progress")
    assert result.code == 1 and "--batch-positions does not apply to --audio-column" in result.err


@pytest.mark.parametrize("inner", [(), (3,)])
def test_gather_of_long_rows_copies_what_the_index_path_gives(inner):
    """ColumnBlock.gather copies long rows (audio samples) a slice per row; the per-position index path
    (forced by passing its plan) gives the same block, padding and lengths."""
    import pyarrow as pa

    from softlabels.inputs import ColumnBlock

    rng = np.random.default_rng(5)
    lengths = rng.integers(300, 1_301, size=9)
    lengths[4] = 0  # an empty row among long ones
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = pa.array(rng.normal(size=int(lengths.sum()) * int(np.prod(inner))).astype(np.float32))
    values = pa.FixedSizeListArray.from_arrays(flat, inner[0]) if inner else flat
    block = ColumnBlock.from_arrow(pa.ListArray.from_arrays(pa.array(offsets), values), "x")
    rows = np.array([7, 0, 4, 3, 8, 1])
    fast, fast_lengths = block.gather(rows, fill=-1.5)
    slow, slow_lengths = block.gather(rows, fill=-1.5, plan=block.plan(rows))
    np.testing.assert_array_equal(fast_lengths, lengths[rows])
    np.testing.assert_array_equal(slow_lengths, lengths[rows])
    assert fast.shape == slow.shape == (len(rows), int(lengths[rows].max()), *inner)
    np.testing.assert_array_equal(fast, slow)
