"""simsearch.store.spool: the add's temporary vector file."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.store.spool import VectorSpool


def test_blocks_give_back_what_was_appended_in_order(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 0, 10, 1)]
    with VectorSpool(tmp_path / "v.f32", 5) as spool:
        ranges = [spool.append(p) for p in parts]
        assert ranges == [(0, 3), (3, 3), (3, 13), (13, 14)]
        assert len(spool) == 14
        blocks = list(spool.blocks(rows=4))
        assert [len(b) for b in blocks] == [4, 4, 4, 2]
        np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(parts))
        # blocks can be read again (the coreset and the bank each take a pass)
        np.testing.assert_array_equal(np.concatenate(list(spool.blocks())), np.concatenate(parts))


def test_float64_is_stored_as_float32_and_bad_shapes_are_refused(tmp_path):
    with VectorSpool(tmp_path / "v.f32", 2) as spool:
        spool.append(np.ones((2, 2), np.float64))
        assert next(spool.blocks()).dtype == np.float32
        with pytest.raises(ValueError, match=r"\(m, 2\)"):
            spool.append(np.ones((2, 3), np.float32))
        with pytest.raises(ValueError):
            spool.append(np.ones(2, np.float32))
