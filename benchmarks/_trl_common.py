"""TRL side of benchmarks/train_step.py and grpo_step.py: SFTTrainer, DPOTrainer and GRPOTrainer runs on given
token ids, timed per step.

Both trainers get fp32 (bf16 off: TRL's configs default it on), gradient checkpointing only when asked
(TRL defaults it on; jaxrl_llm's `remat` is set the same way by the caller), unless `trl_defaults` leaves those
two to TRL's own defaults (what a user who sets neither gets), AdamW (TRL's default, the fused
torch kernel) with the caller's settings and a constant learning rate, and run their own `train()` loop. A
callback takes the time from the beginning to the end of each optimizer step (forward, backward, clipping,
update; the next batch is fetched and collated before the step begins, logging happens after it ends) and
records the loss TRL logs for each step. For GRPO the step also covers generation and scoring (TRL generates inside
`training_step`); the trainer's generate / reward / reference-model methods are wrapped to time each phase.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Pair = tuple[np.ndarray, np.ndarray, np.ndarray]  # prompt ids, chosen completion ids, rejected completion ids


def word(i: int) -> str:
    """Token id -> its word for the stub tokenizer. Fixed width: transformers cuts special tokens (pad, EOS) out
    of any word that contains them, so no word may contain another ("t2" is inside "t28", "t00002" is not)."""
    return f"t{int(i):05d}"


def text(ids: Sequence[int]) -> str:
    return " ".join(word(i) for i in ids)


def stub_tokenizer(vocab: int, eos_id: int, pad_id: int):
    """A word-level tokenizer that maps `text(ids)` back to exactly `ids` (no special tokens added): TRL wants
    a processing class, and this one makes TRL's tokenization reproduce our token ids. (Trainer copies its pad
    and EOS ids into the model's config, which only generation reads.)"""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({word(i): i for i in range(vocab)}, unk_token=word(0)))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=word(pad_id), eos_token=word(eos_id))


def _step_timer(marks: list[tuple[float, float]], losses: list[float]):
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks.append((self.t0, time.perf_counter()))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepTimer()


def _common_args(opt: dict[str, float], steps: int, remat: bool, trl_defaults: bool = False) -> dict[str, Any]:
    """Trainer arguments shared by the SFT/DPO/GRPO runs. trl_defaults: leave precision and gradient
    checkpointing to TRL's own config defaults (bf16 autocast and checkpointing on, in TRL 1.x)."""
    args = dict(max_steps=steps, learning_rate=opt["lr"], lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=opt["grad_clip"], weight_decay=opt["weight_decay"], adam_beta1=opt["b1"],
                adam_beta2=opt["b2"], adam_epsilon=opt["eps"], bf16=False, fp16=False,
                gradient_checkpointing=remat, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                dataloader_num_workers=0, seed=0, dataset_num_proc=None)
    if trl_defaults:
        for k in ("bf16", "fp16", "gradient_checkpointing"):
            args.pop(k)
    return args


def precision_of(args: Any) -> str:
    """What the TRL run computed in, from its resolved config."""
    return ("bf16" if args.bf16 else "fp16" if args.fp16 else "fp32") + (
        ", gradient checkpointing" if args.gradient_checkpointing else "")


def _load(folder: str):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _result(marks, losses, warmup: int) -> dict[str, Any]:
    times = [b - a for a, b in marks[warmup:]]
    return {"step_s": statistics.median(times), "times": times, "losses": losses}


def time_trl_sft(folder: str, rows: Sequence[tuple[np.ndarray, np.ndarray]], steps: int, warmup: int,
                 opt: dict[str, float], remat: bool, trl_defaults: bool = False) -> dict[str, Any]:
    """SFTTrainer on `rows` (token ids, loss mask: 1 = the token is a target), batch = all rows, one batch per
    step; pre-tokenized with a `completion_mask` column (`completion_only_loss`), padded to the longest row."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = _load(folder)
    ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, ids)) for ids, _ in rows] * (steps + warmup),
                                     "completion_mask": [list(map(int, m)) for _, m in rows] * (steps + warmup)})
    # In order, so that every batch is exactly `rows` (as jaxrl_llm's), not a shuffled mix of repeats.
    order = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in SFTConfig.__dataclass_fields__ \
        else {}
    marks: list[tuple[float, float]] = []
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=len(rows),
                         max_length=max(len(ids) for ids, _ in rows), packing=False, completion_only_loss=True,
                         **order, **_common_args(opt, steps + warmup, remat, trl_defaults))
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                             processing_class=stub_tokenizer(model.config.vocab_size, 2, 0),
                             callbacks=[_step_timer(marks, losses)])
        trainer.train()
    return {**_result(marks, losses, warmup), "precision": precision_of(args)}


def time_trl_dpo(folder: str, pairs: Sequence[Pair], eos_id: int, pad_id: int, max_len: int, steps: int,
                 warmup: int, opt: dict[str, float], remat: bool, beta: float, loss_type: str,
                 trl_defaults: bool = False) -> dict[str, Any]:
    """DPOTrainer on exactly `pairs` as one batch, every step (its own tokenization, collator, reference model
    loaded by TRL from `folder`, `precompute_ref_log_probs=False`).

    The pairs go in as text of `word`s, which TRL tokenizes back to the same ids; every completion must end in
    `eos_id`, so TRL appends no EOS. The tokenized data set is checked against `pairs` before training.
    """
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i, (p, c, r) in enumerate(pairs):
        if c[-1] != eos_id or r[-1] != eos_id:
            raise ValueError(f"pair {i}: completions must end in token {eos_id} (TRL would append it)")
        rows["prompt"].append(text(p) + " ")  # TRL concatenates the prompt and completion strings
        rows["chosen"].append(text(c))
        rows["rejected"].append(text(r))
    model = _load(folder)
    marks: list[tuple[float, float]] = []
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
                         max_length=max_len, beta=beta, loss_type=[loss_type], precompute_ref_log_probs=False,
                         **_common_args(opt, steps + warmup, remat, trl_defaults))
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=datasets.Dataset.from_dict(rows),
                             processing_class=stub_tokenizer(model.config.vocab_size, eos_id, pad_id),
                             callbacks=[_step_timer(marks, losses)])
        seen = sorted((tuple(x["prompt_ids"]), tuple(x["chosen_ids"]), tuple(x["rejected_ids"]))
                      for x in trainer.train_dataset)
        if seen != sorted(tuple(tuple(map(int, a)) for a in pair) for pair in pairs):
            raise RuntimeError("TRL tokenized the pairs to different ids than ours; the comparison would be unfair")
        trainer.train()
    return {**_result(marks, losses, warmup), "precision": precision_of(args)}


def _phase_timer(trainer: Any, phases: dict[str, float]) -> None:
    """Wrap the GRPOTrainer instance's methods so each call adds its seconds to `phases` (and the generated
    tokens and rewards to their counters): generate (`_generate_single_turn`: left padding, HF `generate`, the
    cut after EOS), score (`_calculate_rewards`), reference (reference-model log-probs) and rollout
    (`_generate_and_score_completions`: all of the above plus tokenization, padding and advantages)."""

    def wrap(name: str, fn: Callable, when: Callable[..., bool] = lambda *a: True, after=None) -> Callable:
        def timed(*args, **kw):
            if not when(*args):
                return fn(*args, **kw)
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
            if after is not None:
                after(out)
            return out

        return timed

    def count_tokens(out):
        phases["generated_tokens"] = phases.get("generated_tokens", 0.0) + sum(len(c) for c in out[0])

    def rewards(out):
        phases["reward_sum"] = phases.get("reward_sum", 0.0) + float(out.sum())
        phases["rewards"] = phases.get("rewards", 0.0) + out.numel()

    trainer._generate_single_turn = wrap("generate", trainer._generate_single_turn, after=count_tokens)
    trainer._calculate_rewards = wrap("score", trainer._calculate_rewards, after=rewards)
    trainer._get_per_token_logps_and_entropies = wrap(
        "reference", trainer._get_per_token_logps_and_entropies,
        when=lambda model, *a: trainer.ref_model is not None and model is trainer.ref_model)
    trainer._generate_and_score_completions = wrap("rollout", trainer._generate_and_score_completions)


def time_trl_grpo(folder: str, prompts: Sequence[Sequence[int]],
                  reward_fn: Callable[[list[int], list[list[int]]], Sequence[float]], group_size: int,
                  max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, steps: int, warmup: int,
                  opt: dict[str, float], beta: float, temperature: float, trl_defaults: bool = False
                  ) -> dict[str, Any]:
    """GRPOTrainer, one generation of all `prompts` x `group_size` and one optimizer update per step.

    fp32 without gradient checkpointing (like jaxrl_llm's run), or with `trl_defaults` GRPOConfig's own precision
    and checkpointing defaults (what a user who does not set them gets; recorded as "bf16" and
    "gradient_checkpointing" in the result).

    The prompts go in as text of `word`s (not conversational), which the stub tokenizer turns back into exactly
    these ids (checked). reward_fn(prompt rows, completion ids) -> one reward per completion, `rows` indexing
    `prompts`. Generation stops at `stop_ids` (the stub's EOS and the model's generation-config EOS); empty: at
    max_new_tokens only (the stub's EOS is an id outside the vocabulary, which can never be sampled).
    Sampling as configured: temperature, top-p 1, top-k off, no repetition penalty; loss "dapo" (token-level
    sum over the batch's completion tokens, as jaxrl_llm's token_level), group-std scaled advantages, clip 0.2,
    `beta` > 0 loads a reference model (TRL builds it from `folder`), 0 does not.
    Returns the median step, per-step times and per-phase seconds, generated tokens and rewards.
    """
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    model = _load(folder)
    vocab = model.config.vocab_size
    stop_ids = [int(t) for t in stop_ids]
    model.generation_config.eos_token_id = stop_ids or None
    eos = stop_ids[0] if stop_ids else vocab  # `vocab` is one more stub word, never sampled
    tok = stub_tokenizer(vocab + 1, eos, pad_id)
    rows = {"prompt": [text(p) for p in prompts], "row": list(range(len(prompts)))}
    seen = tok(text=rows["prompt"])["input_ids"]
    if [list(s) for s in seen] != [list(map(int, p)) for p in prompts]:
        raise RuntimeError("the stub tokenizer gave TRL different prompt ids than ours; the comparison would be unfair")

    def grpo_reward(prompts, completions, completion_ids, row, **kw):
        return [float(r) for r in reward_fn(list(row), [list(map(int, c)) for c in completion_ids])]

    phases: dict[str, float] = {}
    records: list[dict[str, float]] = []
    losses: list[float] = []

    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            phases.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            records.append({"step_s": time.perf_counter() - self.t0, **phases})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    common = _common_args(opt, steps + warmup, False, trl_defaults)
    common.pop("dataset_num_proc")
    R = len(prompts) * group_size
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=R, gradient_accumulation_steps=1,
                          num_generations=group_size, max_completion_length=max_new_tokens, temperature=temperature,
                          top_p=1.0, top_k=0, repetition_penalty=1.0, beta=beta, epsilon=0.2, num_iterations=1,
                          loss_type="dapo", scale_rewards="group", use_vllm=False, log_completions=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[grpo_reward], args=args,
                              train_dataset=datasets.Dataset.from_dict(rows), processing_class=tok,
                              callbacks=[StepTimer()])
        _phase_timer(trainer, phases)
        resolved = {k: bool(getattr(trainer.args, k)) for k in ("bf16", "gradient_checkpointing")}
        trainer.train()
    timed = records[warmup:]
    med = lambda k: statistics.median(r.get(k, 0.0) for r in timed)
    phase_s = {k: med(k) for k in ("generate", "score", "reference", "rollout")}
    phase_s["train"] = statistics.median(r["step_s"] - r.get("rollout", 0.0) for r in timed)
    return {"step_s": med("step_s"), "times": [r["step_s"] for r in timed], "phases": phase_s, **resolved,
            "generated_tokens": med("generated_tokens"), "records": records, "losses": losses,
            "reward_mean": [r.get("reward_sum", 0.0) / max(r.get("rewards", 0.0), 1.0) for r in records]}
