"""Whole-run trajectory parity: `train.run` (the CLI's loop: data pipeline, schedule, clipping, accumulation,
weight-decay groups, export) against an independent PyTorch loop a TRL / HF Trainer user would write, from the
same HF weights on the same batches (rows, order and loss masks taken from our pipeline)."""

from __future__ import annotations

import copy
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from hf_models import build_hf_model, tiny_hf_config  # noqa: E402
from recipes import recipe  # noqa: E402
from test_rev30_tok import _tokenizer  # noqa: E402

from jaxrl_llm import train  # noqa: E402
from jaxrl_llm.algorithms.base import batch_indices  # noqa: E402

LR, STEPS, WARMUP, WD, CLIP, B1, B2, EPS, FINAL = 2e-2, 8, 2, 0.1, 0.5, 0.9, 0.95, 1e-6, 0.1
BATCH = 4  # in 2 microbatches


def _lr_lambda(k: int) -> float:
    """HF's cosine-with-min-lr schedule written out: k/warmup during warmup, then cosine down to FINAL."""
    if k < WARMUP:
        return k / WARMUP
    t = (k - WARMUP) / max(1, STEPS - WARMUP)
    return FINAL + (1 - FINAL) * 0.5 * (1 + math.cos(math.pi * t))


def _setup(tmp_path, name: str, rows: list[dict], over: dict):
    """(HF model, tokenizer, config): a tiny Llama with biases saved with a small ChatML tokenizer, the rows as
    JSONL, the `name` recipe on them with the optimizer under test."""
    tok = _tokenizer("qwen2.5")
    hf_cfg = tiny_hf_config("llama", vocab=len(tok), layers=1, hidden=16, heads=4, kv_heads=2, intermediate_size=24,
                            pad_token_id=tok.pad_token_id, attention_bias=True, mlp_bias=True)
    hf = build_hf_model(hf_cfg, seed=1)
    hf.save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = recipe(name, {
        "model.path": str(tmp_path / "init"), "model.init": None, "tokenizer": "", "data.source": str(src),
        "data.num_examples": -1, "data.max_len": 48, "data.cache": False, "export_hf": True,
        "metrics.tensorboard": False, "max_steps": STEPS, "log_every": 1, "train.batch_size": BATCH,
        "train.microbatches": 2, "optimizer": dict(lr=LR, warmup_steps=WARMUP, schedule="cosine", weight_decay=WD,
                                                   b1=B1, b2=B2, eps=EPS, grad_clip=CLIP, final_lr_fraction=FINAL),
        **over})
    return hf, tok, config


def _torch_optimizer(hf):
    """AdamW with the Trainer's two groups (decay on every matrix, embeddings and head included; none on norms and
    biases) and the schedule stepped after each update."""
    named = list(hf.named_parameters())
    groups = [{"params": [p for n, p in named if "norm" not in n and "bias" not in n], "weight_decay": WD},
              {"params": [p for n, p in named if "norm" in n or "bias" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda)


def _seq_logps(model, seqs: list[tuple[np.ndarray, np.ndarray]], pad: int):
    """Per row: the summed log-prob of the tokens its loss mask marks (the first token never a target), right
    padded in one forward."""
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor(np.stack([np.pad(i, (0, T - len(i)), constant_values=pad) for i, _ in seqs]), dtype=torch.long)
    att = torch.tensor(np.stack([np.pad(np.ones_like(i), (0, T - len(i))) for i, _ in seqs]))
    lm = torch.tensor(np.stack([np.pad(m, (0, T - len(m))) for _, m in seqs])[:, 1:], dtype=torch.float32)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits, -1)
    return (logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * lm).sum(-1), lm.sum()


def _compare(tmp_path, hf, logged, losses, norms, rates, clip: float = CLIP):
    assert rates[0] == 0.0 and sum(n > clip for n in norms) >= 4  # warmup starts at 0; clipping acted
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in logged], losses, rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in logged], norms, rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in logged], rates, rtol=1e-6, atol=1e-9)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    got, init = ours.state_dict(), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "init").state_dict()
    for name, want in hf.state_dict().items():
        assert (want - init[name]).abs().max() > 1e-3, name  # every parameter moved
        np.testing.assert_allclose(got[name].numpy(), want.detach().numpy(), rtol=1e-5, atol=2e-6, err_msg=name)


def _run(config, tmp_path) -> tuple[list[dict], dict]:
    """(metrics.jsonl's rows, what `train.run` returns: the last row and the data stats)"""
    out = train.run(config, str(tmp_path / "run"))
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()], out


def test_sft_run_follows_a_torch_adamw_loop(tmp_path):
    """8 SFT steps (batches of 4 in 2 microbatches, warmup 2 then cosine, clipping acting, decay on matrices and
    embeddings only): the per-step losses, pre-clip grad norms and rates in metrics.jsonl and the exported weights
    equal the torch loop's (each microbatch's NLL sum over the step's target count, the Trainer's
    num_items_in_batch normalisation)."""
    rows = [{"prompt": [{"role": "system", "content": "No."}, {"role": "user", "content": f"What is {i}+{i % 3}?"}],
             "completion": [{"role": "assistant", "content": f"It is {2 * i + i % 3}. " + "Be brief. " * (i % 3)}]}
            for i in range(10)]
    hf, tok, config = _setup(tmp_path, "sft_tiny", rows, {"data.length_buckets": 0})
    logged, _ = _run(config, tmp_path)

    from jaxrl_llm.algorithms import sft

    examples, _ = sft.prepare(config, transformers.AutoTokenizer.from_pretrained(tmp_path / "init"))
    hf.double().train()  # the reference in fp64: ours (fp32) is compared with the exact trajectory

    def microbatch_losses(step):
        idx = batch_indices(len(examples), BATCH, config.seed, step)
        micro = [[examples[i] for i in idx[:2]], [examples[i] for i in idx[2:]]]
        count = sum(int(m[1:].sum()) for ex in micro for _, m in ex)
        for ex in micro:  # accumulation as the Trainer does it
            lp, _ = _seq_logps(hf, ex, tok.pad_token_id)
            yield -lp.sum() / count

    _compare(tmp_path, hf, logged, *_torch_trajectory(hf, microbatch_losses, CLIP))


def _torch_trajectory(hf, microbatch_losses, clip):
    """(losses, grad norms, rates) of STEPS torch AdamW steps: each step's microbatch losses backpropagated (the
    accumulated gradient), clipped to `clip`, then the optimizer's and the schedule's step."""
    opt, sched = _torch_optimizer(hf)
    losses, norms, rates = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for loss in microbatch_losses(step):
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        rates.append(opt.param_groups[0]["lr"])
        norms.append(float(torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)))
        opt.step()
        sched.step()
    return losses, norms, rates


def test_dpo_run_follows_a_torch_adamw_loop(tmp_path):
    """8 DPO steps (sigmoid, beta 0.1, summed completion log-probs as TRL's default; the reference the starting
    weights, frozen; pairs run with their shared prefix once) with the SFT test's optimizer, clipping at 0.2: the
    per-step losses, grad norms, rates and exported weights equal a torch loop's over the same pairs (each
    microbatch's loss sum over the step's pair count)."""
    rows = [{"prompt": [{"role": "system", "content": "No."}, {"role": "user", "content": f"What is {i}+{i % 3}?"}],
             "chosen": [{"role": "assistant", "content": f"It is {2 * i + i % 3}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + i % 3 + 1}."}]} for i in range(10)]
    beta = 0.1
    clip = 0.2
    hf, tok, config = _setup(tmp_path, "dpo_tiny", rows, {"dpo.beta": beta, "data.max_len": 64,
                                                          "optimizer.grad_clip": clip})
    logged, out = _run(config, tmp_path)
    assert out["data_shared_prefix"] == 1

    from jaxrl_llm.data import preference

    config.data.shared_prefix = False  # the same pairs, in the same order, each side whole
    examples, _ = preference.prepare(config, transformers.AutoTokenizer.from_pretrained(tmp_path / "init"))
    assert isinstance(examples[0], preference.PreferencePair)
    hf.double().train()  # the reference in fp64: ours (fp32) is compared with the exact trajectory
    ref = copy.deepcopy(hf).eval()

    def microbatch_losses(step):
        idx = batch_indices(len(examples), BATCH, config.seed, step)
        for half in (idx[:2], idx[2:]):
            pairs = [examples[i] for i in half]
            seqs = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
            lp, _ = _seq_logps(hf, seqs, tok.pad_token_id)
            with torch.no_grad():
                ref_lp, _ = _seq_logps(ref, seqs, tok.pad_token_id)
            margin = (lp[:2] - ref_lp[:2]) - (lp[2:] - ref_lp[2:])
            yield -torch.nn.functional.logsigmoid(beta * margin).sum() / BATCH

    _compare(tmp_path, hf, logged, *_torch_trajectory(hf, microbatch_losses, clip), clip)
