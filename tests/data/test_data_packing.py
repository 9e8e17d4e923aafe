"""Padding to bucketed [B, T] int32 batches with masks."""

import numpy as np
import pytest

from jaxselm.data.batching import bucket_length, pad_batch
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
