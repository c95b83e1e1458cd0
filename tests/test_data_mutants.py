"""Data-pipeline and run-folder behaviour that no other test pins down (found by mutation testing): first-fit
packing, the seeded per-epoch batch order a resume relies on, the seeded validation split, and the folder swap
that keeps a workdir's tokenizer/ whole."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxrl_llm.algorithms import batch_indices
from jaxrl_llm.algorithms.sft import pack
from jaxrl_llm.workdir import replace_folder


def _ex(n: int, tag: int):
    return (np.full(n, tag, np.int32), np.ones(n, np.int32))


def _tags(rows):
    return [[int(ids[0]) for ids, _ in row] for row in rows]


def test_pack_is_first_fit_and_fills_a_row_exactly():
    """An example goes into the first earlier row with room for it (not only the last one), and a row can be
    filled to exactly max_len."""
    rows = pack([_ex(4, 1), _ex(6, 2), _ex(4, 3), _ex(2, 4)], 8)
    assert _tags(rows) == [[1, 3], [2, 4]]
    assert [sum(len(ids) for ids, _ in row) for row in rows] == [8, 8]
    assert _tags(pack([_ex(8, 1), _ex(8, 2)], 8)) == [[1], [2]]  # a full-length example fills its own row


def test_batch_order_is_seeded_reshuffled_each_epoch_and_a_function_of_the_step():
    n, B = 12, 4
    stream = [i for step in range(9) for i in batch_indices(n, B, seed=7, step=step)]  # 3 epochs
    epochs = [stream[k * n:(k + 1) * n] for k in range(3)]
    for e in epochs:  # every example once per epoch
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a fresh permutation each epoch
    # the seed decides the order (data order is part of a run's recipe)
    assert [batch_indices(n, B, seed=s, step=0) for s in (0, 1, 2)] != [batch_indices(n, B, seed=0, step=0)] * 3
    # a resume at step s gets the batch an uninterrupted run would have (no batch skipped or repeated)
    for step in range(9):
        assert batch_indices(n, B, 7, step) == stream[step * B:(step + 1) * B]
    # a batch that straddles an epoch boundary takes the end of one permutation and the start of the next
    n2 = 10
    flat = [i for step in range(5) for i in batch_indices(n2, B, 3, step)]
    assert sorted(flat[:n2]) == list(range(n2)) and sorted(flat[n2:2 * n2]) == list(range(n2))


def test_validation_split_is_seeded_disjoint_and_stable():
    from jaxrl_llm.train import split_validation

    examples = list(range(40))
    train_a, val_a = split_validation(examples, 0.25, seed=1)
    assert len(val_a) == 10 and sorted(train_a + val_a) == examples and not set(train_a) & set(val_a)
    assert split_validation(examples, 0.25, seed=1) == (train_a, val_a)  # the same on every restart
    assert any(split_validation(examples, 0.25, seed=s)[1] != val_a for s in (2, 3, 4))  # the seed picks it
    assert split_validation(examples, 0.0, seed=1) == (examples, [])


def test_replace_folder_swaps_in_the_new_folder_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "tokenizer"
    path.mkdir()
    (path / "old.json").write_text("old")

    def fill(p):
        os.makedirs(p)
        with open(os.path.join(p, "new.json"), "w") as f:
            f.write("new")

    replace_folder(str(path), fill)
    assert sorted(os.listdir(path)) == ["new.json"]
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]  # no <path>.tmp-<pid> / <path>.old-<pid> left


def test_replace_folder_keeps_the_old_folder_when_filling_fails(tmp_path):
    path = tmp_path / "tokenizer"
    path.mkdir()
    (path / "old.json").write_text("old")

    def fill(p):
        os.makedirs(p)
        with open(os.path.join(p, "half.json"), "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(str(path), fill)
    assert sorted(os.listdir(path)) == ["old.json"] and (path / "old.json").read_text() == "old"


def test_sft_prepare_honours_last_assistant_only(tokenizer, tmp_path):
    """data.last_assistant_only reaches the tokenizer of the SFT rows: only the last reply is learned."""
    import json

    from recipes import recipe

    from jaxrl_llm.algorithms import sft

    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6, surely."}]}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(row) + "\n")
    learned = {}
    for last_only in (False, True):
        c = recipe("sft_tiny", {"data.source": str(path), "data.num_examples": -1,
                                "data.last_assistant_only": last_only})
        (ids, mask), = sft.prepare(c, tokenizer)[0]
        learned[last_only] = tokenizer.decode(ids[mask == 1])
    assert learned == {False: "4<|im_end|>\n6, surely.<|im_end|>\n", True: "6, surely.<|im_end|>\n"}


def test_a_cut_preference_pair_keeps_its_start(tokenizer, tmp_path):
    """data.overlong='truncate' keeps the first data.max_len tokens of each side (the prompt and the start of the
    reply), as SFT does: the pair is a prefix of its uncut tokenization."""
    import json

    import ml_collections

    from jaxrl_llm.data import preference as pref

    tail = " ".join(["word"] * 80)
    row = {"prompt": "Q?", "chosen": "A " + tail, "rejected": "B " + tail}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = ml_collections.ConfigDict(dict(data=dict(source=str(path), num_examples=-1, max_len=64,
                                                   overlong="truncate", chat_template="", shared_prefix=False)))
    (pair,), stats = pref.prepare(cfg, tokenizer)
    assert stats["truncated"] == 1
    full = pref.tokenize_pair(tokenizer, *pref.to_preference(row, 0))
    for cut, whole in zip(pair[:4], full[:4], strict=True):
        assert len(cut) == 64
        np.testing.assert_array_equal(cut, whole[:64])


def test_a_pair_batch_is_as_wide_as_its_longer_side_whichever_it_is():
    import ml_collections

    from jaxrl_llm.data import preference as pref

    def side(n):
        return np.arange(1, n + 1, dtype=np.int32), np.ones(n, np.int32)

    cfg = ml_collections.ConfigDict(dict(data=dict(max_len=128, length_buckets=4)))
    pair = pref.PreferencePair(*side(10), *side(40))  # the rejected side is the longer
    assert pref.batch_widths([pair], cfg) == {"length": 40}
    batch = pref.collate([pair], cfg, 0)
    assert batch["input_ids"].shape == (1, 2, 40) and batch["attention_mask"][0, 1].sum() == 40
