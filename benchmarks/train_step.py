"""Training throughput (tokens/s) of one SFT optimizer step: jaxrl_llm vs TRL's SFTTrainer, same CPU, one run.

Both train SmolLM2-135M (random weights from its config, written once with `save_pretrained` and loaded by
both) on the same batch shape [B, T] with every token in the loss, AdamW, grad clipping 1.0, fp32. TRL runs
its own `SFTTrainer.train()` loop on a pre-tokenized dataset; step times come from a callback (begin/end of
each optimizer step), the first `--warmup` steps dropped. jaxrl_llm runs the jitted step that
`python -m jaxrl_llm.train` uses (`algorithms.sft.make_sft_step`, donated state), compile time reported
apart. On a GPU the table adds MFU (6 * params * tokens / step time / peak).

    python benchmarks/train_step.py                       # B=4, T=256
    python benchmarks/train_step.py --batch 8 --length 128 --steps 5 --json /tmp/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import SMOLLM2_135M  # noqa: E402  (same model definition as the forward benchmark)

from jaxrl_llm import models  # noqa: E402
from jaxrl_llm.algorithms.sft import make_sft_step  # noqa: E402
from jaxrl_llm.optim import make_optimizer  # noqa: E402


def build_weights(folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SMOLLM2_135M)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def time_jax(folder: str, ids: np.ndarray, steps: int, warmup: int) -> dict:
    cfg, params = models.load_pretrained(folder)
    opt, _ = make_optimizer(1e-5, steps + warmup, schedule="constant", grad_clip=1.0, b2=0.999, weight_decay=0.0)
    step = jax.jit(make_sft_step(cfg, opt), donate_argnums=0)
    state = {"params": params, "opt_state": jax.jit(opt.init)(params), "step": jnp.int32(0)}
    ones = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones, "segment_ids": ones,
             "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy()}
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps + warmup - 1):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        if i >= warmup - 1:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "times": times, "compile_s": compile_s,
            "loss": float(m["loss"]), "params": models.num_params(cfg)}


def time_trl(folder: str, ids: np.ndarray, steps: int, warmup: int) -> dict:
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, r)) for r in ids] * (steps + warmup)})
    marks: list[tuple[float, float]] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks.append((self.t0, time.perf_counter()))

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=ids.shape[0], max_steps=steps + warmup,
                         learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
                         max_length=ids.shape[1], packing=False, report_to=[], save_strategy="no",
                         logging_steps=10_000, use_cpu=True, dataloader_num_workers=0, seed=0,
                         completion_only_loss=False, dataset_num_proc=1)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                             processing_class=_dummy_tokenizer(folder, model.config.vocab_size),
                             callbacks=[Timer()])
        trainer.train()
    times = [b - a for a, b in marks[warmup:]]
    return {"step_s": statistics.median(times), "times": times}


def _dummy_tokenizer(folder: str, vocab: int):
    """TRL wants a processing class; the dataset is pre-tokenized, so a word-level stub with pad/eos suffices."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s for MFU (GPU)")
    a = ap.parse_args()

    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}), cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    ids = np.random.default_rng(0).integers(3, SMOLLM2_135M["vocab_size"], (a.batch, a.length)).astype(np.int32)
    tokens = a.batch * a.length
    with tempfile.TemporaryDirectory() as folder:
        build_weights(folder)
        ours = time_jax(folder, ids, a.steps, a.warmup)
        trl = None if a.no_trl else time_trl(folder, ids, a.steps, a.warmup)
    rows = [("jaxrl_llm sft step", ours["step_s"])]
    if trl:
        rows.append(("TRL SFTTrainer step", trl["step_s"]))
    print(f"\nSFT, SmolLM2-135M ({ours['params'] / 1e6:.1f}M params), fp32, batch {a.batch} x length {a.length}, "
          f"median of {a.steps} steps (jax compile {ours['compile_s']:.1f}s)\n")
    head = "| trainer | s/step | tokens/s |" + (" MFU |" if a.peak_flops else "")
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for name, s in rows:
        mfu = f" {6 * ours['params'] * tokens / s / a.peak_flops:.1%} |" if a.peak_flops else ""
        print(f"| {name} | {s:.3f} | {tokens / s:,.0f} |{mfu}")
    if trl:
        print(f"\njaxrl_llm / TRL speed-up: {trl['step_s'] / ours['step_s']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "jaxrl_llm": ours, "trl": trl}, f, indent=2)


if __name__ == "__main__":
    main()
