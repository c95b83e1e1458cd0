"""GRPO's and evaluation's prompts: a message of a role the chat template leaves out of its text (Qwen2.5's
renders no OpenAI `developer` message) is refused naming the task; the model was asked without it."""

from __future__ import annotations

import pytest
from test_rev29_shapes import QWEN25_TEMPLATE

from jaxrl_llm.data import DataError
from jaxrl_llm.environments.base import Task
from jaxrl_llm.evaluation import evaluate_tasks
from jaxrl_llm.rl_train import prompt_ids
from jaxrl_llm.sampling import SamplingParams

DEV = {"role": "developer", "content": "Answer in French."}
TASKS = [Task(({"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}), {"answer": "2"}),
         Task((DEV, {"role": "user", "content": "2+2?"}), {"answer": "4"})]


def test_grpo_prompts_with_a_dropped_role_are_refused(tokenizer):
    with pytest.raises(DataError, match="task 1: has a 'developer' message, which the chat template leaves out"):
        prompt_ids(tokenizer, TASKS, QWEN25_TEMPLATE, 64, "drop")
    ids, keep, _ = prompt_ids(tokenizer, TASKS[:1], QWEN25_TEMPLATE, 64, "drop")  # system: rendered
    assert keep == [0] and "<|im_start|>system\nS<|im_end|>" in tokenizer.decode(ids[0])
    ids, keep, _ = prompt_ids(tokenizer, TASKS, None, 64, "drop")  # SmolLM2's ChatML renders every role
    assert keep == [0, 1] and "<|im_start|>developer\nAnswer in French." in tokenizer.decode(ids[1])


def test_evaluation_prompts_with_a_dropped_role_are_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", QWEN25_TEMPLATE)
    with pytest.raises(DataError, match="task 1: has a 'developer' message"):
        evaluate_tasks(None, None, tokenizer, TASKS, env=None, n_samples=1,
                       sampling_params=SamplingParams(max_new_tokens=4, stop_token_ids=(2,)))
