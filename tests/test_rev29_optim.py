"""Optimizer semantics against what a TRL / HF Trainer user runs: torch.optim.AdamW with the Trainer's weight-decay
groups, transformers' get_*_schedule_with_warmup stepped after each update, clip_grad_norm_ on the step's mean
gradient (microbatches accumulated), the pre-clip norm logged."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from hf_models import build_hf_model, tiny_hf_config  # noqa: E402
from transformers import optimization as hf_opt  # noqa: E402

from jaxrl_llm import models  # noqa: E402
from jaxrl_llm.algorithms.sft import collate, make_sft_step  # noqa: E402
from jaxrl_llm.models.config import config_from_hf  # noqa: E402
from jaxrl_llm.models.hf_io import HF_NAMES  # noqa: E402
from jaxrl_llm.optim import decay_mask, learning_rate_schedule, make_optimizer  # noqa: E402


def _hf_rates(schedule: str, warmup: int, total: int, final: float, lr: float) -> list[float]:
    """The rate of each of `total` updates under the Trainer's scheduler (stepped after each update)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "cosine":
        sched = hf_opt.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=final)
    elif schedule == "linear":
        sched = hf_opt.get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = hf_opt.get_constant_schedule_with_warmup(opt, warmup)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("schedule,final", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0), ("constant", 0.0)])
def test_rate_of_every_step_is_the_hf_schedules(schedule, final):
    """Update k (0-based) uses HF's lambda(k): 0 on the first step under warmup (as the Trainer, whose scheduler
    steps after the optimizer), the full rate at step `warmup`, the same cosine/linear decay; warmup = max_steps
    is all warmup."""
    for total in (1, 2, 5, 12):
        for warmup in sorted({0, 1, total // 2, total - 1, total}):
            ours = learning_rate_schedule(2.0, total, warmup, schedule, final)
            got = np.array([float(ours(k)) for k in range(total)])
            np.testing.assert_allclose(got, _hf_rates(schedule, warmup, total, final, 2.0), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{schedule} total={total} warmup={warmup}")


FAMILIES = {"llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
            "mistral": ("mistral", {}), "qwen2": ("qwen2", dict(tie=True)), "qwen3": ("qwen3", dict(head_dim=8))}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decay_mask_is_the_trainers(name):
    """The parameters that get weight decay are those of Trainer.get_decay_parameter_names (not biases, RMSNorm
    scales, Qwen3's q_norm/k_norm; embeddings, tied or not, and heads decayed), also for a score head."""
    family, kw = FAMILIES[name]
    hf_cfg = tiny_hf_config(family, vocab=31, layers=2, hidden=16, heads=4, kv_heads=2, **kw)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        hf_cfg.num_labels = 1
        hf = cls.from_config(hf_cfg)
        names = {n for n, _ in hf.named_parameters()}  # a tied lm_head is the embedding (named once)
        decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf)) & names
        cfg = config_from_hf(hf_cfg.to_dict())
        if cls is transformers.AutoModelForSequenceClassification:
            cfg = dataclasses.replace(cfg, num_labels=1)
        ours = {}
        for path, value in jax.tree_util.tree_flatten_with_path(decay_mask(models.abstract_params(cfg)))[0]:
            key = "/".join(str(k.key) for k in path)
            template = HF_NAMES[key].template
            for i in range(cfg.num_layers if key.startswith("layers/") else 1):
                ours[template.format(i=i)] = bool(value)
        assert set(ours) == names, (set(ours) ^ names)
        assert {n for n, v in ours.items() if v} == decayed, ({n for n, v in ours.items() if v} ^ decayed)


def test_three_steps_equal_torch_adamw_with_hf_schedule_and_clipping(tmp_path):
    """3 SFT steps (2 microbatches each) from the same weights: torch AdamW on the Trainer's decay groups,
    get_cosine_schedule_with_warmup stepped after each update, clip_grad_norm_ triggering on the mean gradient.
    The parameters agree to 2e-6 (fp32) and the logged grad_norm is the pre-clip norm clip_grad_norm_ returns."""
    lr, total, warmup, wd, clip, b1, b2, eps = 1e-2, 5, 2, 0.1, 0.5, 0.9, 0.95, 1e-3
    hf_cfg = tiny_hf_config("llama", vocab=41, layers=1, hidden=16, heads=4, kv_heads=2, intermediate_size=24,
                            attention_bias=True, mlp_bias=True)
    hf = build_hf_model(hf_cfg, seed=0)
    init = {k: v.clone() for k, v in hf.state_dict().items()}
    hf.save_pretrained(tmp_path / "init")
    cfg, params = models.load_pretrained(str(tmp_path / "init"), dtype=jnp.float32)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)  # placed as the step returns them
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        rows = [rng.integers(3, 41, n).astype(np.int32) for n in (9, 6, 11, 7)]
        masks = [(np.arange(len(r)) >= len(r) // 3).astype(np.int32) for r in rows]
        batches.append(collate(list(zip(rows, masks, strict=True)), None, 0, {"length": 12, "targets": 12}))

    opt, _ = make_optimizer(lr, total, warmup_steps=warmup, schedule="cosine", weight_decay=wd, b1=b1, b2=b2,
                            eps=eps, grad_clip=clip)
    step = jax.jit(make_sft_step(cfg, opt, num_micro=2))
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    ours_norms = []
    for b in batches:
        state, m = step(state, {k: jnp.asarray(v) for k, v in b.items()})
        ours_norms.append(float(m["grad_norm"]))

    hf.train()
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf))
    groups = [{"params": [p for n, p in hf.named_parameters() if n in decayed], "weight_decay": wd},
              {"params": [p for n, p in hf.named_parameters() if n not in decayed], "weight_decay": 0.0}]
    t_opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)
    t_sched = transformers.get_cosine_schedule_with_warmup(t_opt, warmup, total)
    torch_norms = []
    for b in batches:
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=torch.tensor(b["attention_mask"])).logits, -1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        loss_mask = torch.tensor(b["loss_mask"][:, 1:], dtype=torch.float32)
        t_opt.zero_grad()
        ((nll * loss_mask).sum() / loss_mask.sum()).backward()
        torch_norms.append(float(torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)))
        t_opt.step()
        t_sched.step()

    assert min(torch_norms) > clip  # clipping acted on every step
    np.testing.assert_allclose(ours_norms, torch_norms, rtol=1e-5)
    models.save_pretrained(cfg, state["params"], str(tmp_path / "ours"))
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    got = ours.state_dict()
    for name, want in hf.state_dict().items():
        assert (want - init[name]).abs().max() > 1e-4, name  # every parameter moved
        np.testing.assert_allclose(got[name].numpy(), want.detach().numpy(), atol=2e-6, err_msg=name)
