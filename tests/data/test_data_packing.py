"""The one packer: bucketed [B, T] int32 batches with masks, filler rows, typed batches."""

import jax
import numpy as np
import pytest

from jaxselm.data.packing import (
    LogProbs,
    PreferenceBatch,
    PromptBatch,
    bucket_length,
    pack_preferences,
    pack_prompts,
    pack_sequences,
    pad_batch,
    take_rows,
)
from jaxselm.errors import DataError


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert bucket_length(3, min_length=16) == 16
    assert [bucket_length(n, multiple=8) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]
    assert bucket_length(100, max_length=64) == 64


def test_left_pad():
    batch = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert batch.ids.dtype == np.int32 and batch.ids.shape == (3, 4)
    np.testing.assert_array_equal(batch.ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.lengths, [3, 1, 0])


def test_right_pad_batch_size_and_truncation():
    batch = pad_batch([[1, 2, 3, 4, 5]], pad_id=9, side="right", multiple=4, batch_size=2)
    np.testing.assert_array_equal(batch.ids, [[1, 2, 3, 4, 5, 9, 9, 9], [9] * 8])
    assert batch.mask.sum() == 5
    # Shapes depend only on the bucket, so jitted consumers see few distinct shapes.
    shapes = {pad_batch([[1] * n], 0).ids.shape for n in range(5, 9)}
    assert shapes == {(1, 8)}
    t = pad_batch([[1, 2, 3, 4, 5]], 0, max_length=4, truncate="left")
    np.testing.assert_array_equal(t.ids, [[2, 3, 4, 5]])
    t = pad_batch([[1, 2, 3, 4, 5]], 0, max_length=4, truncate="right")
    np.testing.assert_array_equal(t.ids, [[1, 2, 3, 4]])
    with pytest.raises(DataError, match="row 1: 5 tokens exceed max_length 4"):
        pad_batch([[1], [1, 2, 3, 4, 5]], 0, max_length=4)


def test_filler_rows_hold_one_real_token_on_the_padding_side():
    left = pad_batch([[5, 6]], pad_id=7, length=4, batch_size=3, filler=True)
    np.testing.assert_array_equal(left.ids, [[7, 7, 5, 6], [7, 7, 7, 7], [7, 7, 7, 7]])
    np.testing.assert_array_equal(left.mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
    right = pad_batch([[5, 6]], pad_id=7, side="right", length=4, batch_size=2, filler=True)
    np.testing.assert_array_equal(right.mask, [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_pack_prompts():
    batch = pack_prompts([[3, 4, 5], [6]], pad_id=0)
    assert isinstance(batch, PromptBatch) and batch.tokens.shape == (2, 8)  # bucket >= 8
    np.testing.assert_array_equal(batch.tokens[1], [0] * 7 + [6])
    filled = pack_prompts([[3]], pad_id=0, length=8, batch_size=4)
    assert filled.tokens.shape == (4, 8) and filled.mask.sum(axis=1).tolist() == [1, 1, 1, 1]
    with pytest.raises(DataError, match=r"prompts\[1\]: empty prompt"):
        pack_prompts([[1], []], pad_id=0)
    with pytest.raises(DataError, match=r"prompts\[0\]: 9 tokens do not fit the padded length 8"):
        pack_prompts([[1] * 9], pad_id=0, length=8)


def test_pack_sequences_marks_the_response():
    seqs = pack_sequences([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert seqs.tokens.shape == (2, 8)  # a multiple of 8
    np.testing.assert_array_equal(seqs.tokens[0, :6], [1, 2, 4, 5, 6, 0])
    np.testing.assert_array_equal(seqs.mask[1], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(seqs.loss_mask[0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(seqs.loss_mask[1], [0, 1, 0, 0, 0, 0, 0, 0])


def test_preference_batch_is_a_pytree_of_one_length():
    batch = pack_preferences([[1], [2, 3]], [[4] * 9, [5]], [[6], [7]], [[8], [9]], pad_id=0)
    assert isinstance(batch, PreferenceBatch) and batch.size == 2
    assert {x.shape for x in jax.tree.leaves(batch)} == {(2, 16)}  # 2 + 9 tokens -> 16
    pairs = pack_preferences([[1]], [[2]], [[3]], pad_id=0)
    assert pairs.refresp is None and len(jax.tree.leaves(pairs)) == 6
    ref = LogProbs(chosen=np.array([1.0, 2.0]), rejected=np.array([3.0, 4.0]))
    rows = take_rows(batch.replace(ref_logps=ref), [1])
    assert rows.size == 1 and rows.ref_logps.rejected.tolist() == [4.0]
    np.testing.assert_array_equal(rows.chosen.tokens[0, :3], [2, 3, 5])
