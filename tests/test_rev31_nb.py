"""The notebook user's path: datasets.Dataset objects passed to train.run / evaluate.run, and what a run leaves
behind in the Python process it ran in."""

from __future__ import annotations

import datasets

from jaxrl_llm.data.sources import load_rows


def test_a_dataset_with_a_transform_is_read_as_it_shows_its_rows():
    """ds.with_transform(f) (or set_transform) shows f's rows in ds[i]; the run read the stored table instead (the
    format was reset to read Python objects), so it trained on other text than the notebook printed, silently."""
    base = datasets.Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}", "raw": i} for i in range(3)])
    shout = base.with_transform(lambda b: {"prompt": b["prompt"], "completion": [c.upper() for c in b["completion"]]})
    assert shout[0] == {"prompt": "q0", "completion": "A0"}
    assert load_rows(shout) == [shout[i] for i in range(3)]
    assert load_rows(shout, 2) == [shout[0], shout[1]]  # (data.num_examples: the first rows, transformed)
    assert load_rows(base.with_format("numpy")) == base.to_list()  # other formats: the stored rows, as before
