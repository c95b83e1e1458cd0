"""A tokenized dataset is held for the whole run in 3 bytes a token (uint16 ids where they fit, uint8 loss masks),
not int32's 8; batches built from it are the int32 batches the full-width rows give, and the data cache keeps
ids that need 32 bits as they are."""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxrl_llm.algorithms import sft
from jaxrl_llm.data import cache as cache_lib
from jaxrl_llm.data import preference as pref
from jaxrl_llm.data.bulk import compact


def test_compact_narrows_what_fits_and_keeps_what_does_not():
    ids, mask = np.array([0, 5, 65535], np.int32), np.array([0, 1, 1], np.int32)
    small, m = compact(ids, mask)
    assert small.dtype == np.uint16 and m.dtype == np.uint8
    assert small.tolist() == [0, 5, 65535] and m.tolist() == [0, 1, 1]
    big, _ = compact(np.array([3, 65536], np.int32), np.array([0, 1], np.int32))  # a 150k vocabulary's id
    assert big.dtype == np.int32 and big.tolist() == [3, 65536]
    empty, em = compact(np.zeros(0, np.int32), np.zeros(0, np.int32))
    assert empty.size == 0 and em.dtype == np.uint8


def _config(**data) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {"max_len": 32, "length_buckets": 4, **data}})


def test_batches_from_compact_rows_equal_the_int32_ones():
    rng = np.random.default_rng(0)
    wide = [(rng.integers(0, 60000, n).astype(np.int32), (rng.random(n) < 0.6).astype(np.int32))
            for n in (7, 12, 20, 5)]
    narrow = [compact(*ex) for ex in wide]
    assert all(ids.dtype == np.uint16 for ids, _ in narrow)
    packed_wide, packed_narrow = sft.pack(wide, 32), sft.pack(narrow, 32)
    for a, b in ((wide, narrow), (packed_wide, packed_narrow)):
        got, want = sft.collate(b, _config(), pad_id=3), sft.collate(a, _config(), pad_id=3)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == np.int32 and np.array_equal(got[k], want[k]), k

    def pairs(rows):
        return [pref.PreferencePair(rows[i][0], rows[i][1], rows[i + 1][0], rows[i + 1][1]) for i in (0, 2)]

    got, want = pref.collate(pairs(narrow), _config(), pad_id=3), pref.collate(pairs(wide), _config(), pad_id=3)
    for k in want:
        assert got[k].dtype == np.int32 and np.array_equal(got[k], want[k]), k


def test_the_cache_keeps_each_files_width(tmp_path):
    for top in (60000, 150000):
        rows = [[compact(np.array([1, top - 1, 2], np.int32), np.array([0, 1, 1], np.int32))]]
        key = f"{top:064x}"
        cache_lib.save(str(tmp_path), "sft", key, rows, {"rows": 1})
        (((ids, mask),),), info = cache_lib.load(str(tmp_path), "sft", key)
        assert ids.dtype == (np.uint16 if top <= 2**16 else np.int32) and mask.dtype == np.uint8
        assert ids.tolist() == [1, top - 1, 2] and mask.tolist() == [0, 1, 1] and info == {"rows": 1}
