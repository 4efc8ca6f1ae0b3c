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
