"""The GRPO training loop (`python -m jaxrl_llm.train` with algorithm='grpo').

One step, all on the config's mesh with the trainer's own arrays (no inference engine, no weight copy):
  1. host: the step's prompts (a pure function of seed and step) -> chat template -> token ids, x group_size
  2. device: `sampling.generate` with the current params -> completions and the sampler's log-probs (with
     rollout.max_turns > 1, `multiturn.multi_turn_rollout` alternates generation and environment turns)
  3. host: environment rewards (worker processes with timeouts), DAPO shaping / dynamic sampling / filtering
  4. host+device: group advantages; reference log-probs (frozen copy, same mesh; in host memory between steps
     with grpo.ref_offload) when kl_coef > 0; old
     log-probs recomputed only when configured (otherwise the sampler's, which are the trainer's)
  5. device: for each epoch and minibatch, one optimizer update (microbatch accumulation, donated state); the
     log-prob and loss passes run on chunks cut to their rows' widths (`rl_lengths`, grpo.length_buckets)
  6. host: metrics (reward, accuracy, KL, clip fraction, entropy, lengths, tokens/s, time per phase), checkpoint
A run restarted with the same workdir resumes from its latest checkpoint and logs the same numbers.

Several processes (jaxrl_llm.distributed): every process runs the same loop on one global mesh. The step's
prompts are a pure function of (seed, step), so each process builds the same list; the sampler places each
process's rows and returns every completion to every process; each process scores its contiguous share of the
completions in its own worker pool and the rewards are gathered; the training arrays are placed from the
identical host batch (each process its own rows). Process 0 writes metrics; all take part in checkpoints and
the HF export.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_llm import distributed, models, multiturn, parallel, rl_lengths, sampling
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.base import batch_indices
from jaxrl_llm.checkpoint import weights_checksum
from jaxrl_llm.data.chat import DataError, check_prompt_roles, run_template
from jaxrl_llm.data.sources import describe_source
from jaxrl_llm.data.vocab import check_ids_fit, check_pad_fits, with_tokenizer_ids
from jaxrl_llm.environments.split import score_across_processes
from jaxrl_llm.metrics import StepWindow
from jaxrl_llm.optim import make_optimizer
from jaxrl_llm.preemption import Preempted, StopOnSigterm, checkpoint_step
from jaxrl_llm.rl_batch import (
    Rollouts,
    check_shared_prompts,
    compute_advantages,
    logprob_error_metrics,
    mask_logprob_errors,
    prepare_batch,
    reduce_updates,
    reward_components,
    reward_kl,
    sample_accuracy,
    scaled_rewards,
    shuffled_rows,
)
from jaxrl_llm.sampling.text import render_prompt
from jaxrl_llm.workdir import close_all, open_run_records

log = logging.getLogger("jaxrl_llm.rl_train")
CONSOLE_KEYS = ("reward_mean", "accuracy", "loss", "kl", "clip_fraction", "entropy", "gen_length_mean", "turns_mean",
                "truncation_rate", "gen_tokens_per_s", "time_generate_s", "time_train_s", "time_step_s")


_SYSTEM_HINT = (" (the task has a system message, from the data or data.system_prompt; a template with no system "
                "role refuses it: leave data.system_prompt empty, or set data.chat_template)")


def prompt_ids(tokenizer: Any, tasks: list, chat_template: str | None, max_prompt_len: int, overlong: str
               ) -> tuple[list[list[int]], list[int], dict[str, int]]:
    """Token ids of each task's templated prompt (generation prompt appended), and the indices of the tasks
    kept: prompts longer than max_prompt_len are dropped or left-truncated per `data.overlong` (counted)."""
    out, keep, stats = [], [], {"prompts": len(tasks), "truncated": 0, "dropped": 0}
    check_prompt_roles(tokenizer, [t.messages for t in tasks], chat_template)
    for i, t in enumerate(tasks):
        try:
            text = render_prompt(tokenizer, list(t.messages), f"task {i}", chat_template)
        except ValueError as e:
            raise DataError(f"{e}{_SYSTEM_HINT if any(m['role'] == 'system' for m in t.messages) else ''}"
                            ) from None
        ids = [int(x) for x in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if len(ids) > max_prompt_len:
            if overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            ids = ids[len(ids) - max_prompt_len:]
        out.append(ids)
        keep.append(i)
    if stats["truncated"] or stats["dropped"]:
        log.warning("data: %d of %d prompts longer than data.max_prompt_len=%d: %d truncated, %d dropped",
                    stats["truncated"] + stats["dropped"], len(tasks), max_prompt_len, stats["truncated"],
                    stats["dropped"])
    if not out:
        raise DataError(f"no prompt fits data.max_prompt_len={max_prompt_len}")
    return out, keep, stats


def rollout_stop_ids(config: ml_collections.ConfigDict, cfg: models.ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """rollout.stop_token_ids, then the model's end ids (config.json's and generation_config.json's eos_token_id)
    and the tokenizer's EOS: the ids `evaluate` stops at, so that training rollouts, validation and evaluation
    of one model end where transformers' generate does."""
    stops = tuple(dict.fromkeys([*config.rollout.stop_token_ids, *sampling.default_stop_ids(cfg, tokenizer)]))
    if not stops:
        raise DataError("the model and the tokenizer name no eos token and rollout.stop_token_ids is empty")
    return stops


def offload_to_host(params: Any) -> Any:
    """The frozen reference in host memory between steps (pinned host memory with the same shardings: each
    process keeps its own shards), leaving device memory to the policy, the optimizer state and the KV cache;
    `reference_logprobs` brings it to the devices for its forward only."""
    return distributed.offload(params)


def _on_host(tree: Any) -> bool:
    return any(x.sharding.memory_kind not in (None, "device") for x in jax.tree.leaves(tree))


def reference_logprobs(fn, ref_params: Any, ids_RT: jax.Array, attn_RT: jax.Array) -> np.ndarray:
    """Reference log-probs [R, T] (every row, on every process) with `fn` (a jitted make_logprobs_fn); offloaded
    parameters are copied to device memory for this call and freed after it."""
    on_host = _on_host(ref_params)
    params = distributed.onload(ref_params) if on_host else ref_params
    out = distributed.to_host(fn(params, ids_RT, attn_RT))
    if on_host:
        jax.tree.map(lambda x: x.delete(), params)
    return out


class GRPORunner:
    """Holds the compiled functions and frozen pieces of a GRPO run; `step` does one RL step.

    position: the prompt batches generated from so far (the data position; one per generation round, so with
    dynamic sampling a step moves it by the rounds it ran, and the prompts are read in order as NeMo RL's
    dataloader reads them); saved in each checkpoint's meta as prompt_batches."""

    position: int = 0

    def __init__(self, config: ml_collections.ConfigDict, cfg: models.ModelConfig, mesh, rules, tokenizer,
                 tasks: list, env, optimizer, opt_sh: Any = None):
        self.config, self.cfg, self.mesh, self.rules, self.tok, self.env = config, cfg, mesh, rules, tokenizer, env
        ro, tc = config.rollout, config.train
        self.G, self.P = ro.group_size, ro.num_prompts
        self.R = self.P * self.G
        self.mb_size = tc.batch_size or self.R
        self.max_turns = ro.get("max_turns", 1)
        self.budget = multiturn.total_token_budget(ro)  # tokens after the prompt: max_new_tokens for one turn
        self.T = config.data.max_prompt_len + self.budget
        self.tasks = tasks
        self.missing_said: set[str] = set()  # reward components said to be missing from some samples (said once)
        self.prompt_ids, self.kept, self.prompt_stats = prompt_ids(
            tokenizer, tasks, run_template(config.data), config.data.max_prompt_len, config.data.overlong)
        check_ids_fit(self.prompt_ids, cfg.vocab_size, tokenizer, "task", self.kept)
        check_pad_fits(cfg.vocab_size, tokenizer)
        stops = rollout_stop_ids(config, cfg, tokenizer)
        self.sp = sampling.SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                                          top_p=ro.top_p, top_k=ro.top_k, stop_token_ids=stops,
                                          stop_strings=ro.get("stop_strings", ()))  # str/None/list as validated
        # stop strings are matched on token ids: each token's bytes, computed once (None: no stop strings)
        self.tok_bytes = sampling.token_bytes(tokenizer) if self.sp.stop_strings else None
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sampling_rules = parallel.sampling_rules(ro.get("sampling_layout", ""))
        self.batch_sh = {k: rules.sharding(mesh, grpo.BATCH_AXES[k],
                                           (self.mb_size,) + ((self.T,) if len(grpo.BATCH_AXES[k]) == 2 else ()))
                         for k in grpo.BATCH_AXES}
        full_sh = rules.sharding(mesh, ("batch", "length"), (self.R, self.T))
        p_sh = self.p_sh = models.param_shardings(cfg, mesh, rules)
        n_micro_lp = max(1, self.R // max(1, self.mb_size // tc.microbatches))
        with jax.set_mesh(mesh):
            self.train_step = jax.jit(grpo.make_train_step(cfg, optimizer, config, rules), donate_argnums=0,
                                      in_shardings=(None, self.batch_sh, None),
                                      out_shardings=({"params": p_sh, "opt_state": opt_sh, "step": None}, None))
            P = config.data.max_prompt_len  # completions start there in every row
            self.group = grpo.shared_prompt_group(config)  # rows per shared prompt in log-prob/loss passes
            self.ref_logprobs = jax.jit(grpo.make_logprobs_fn(cfg, ro.temperature, n_micro_lp, rules,
                                                              first_target=P, group=self.group),
                                        in_shardings=(p_sh, full_sh, full_sh))
            self.policy_logprobs = jax.jit(grpo.make_logprobs_fn(cfg, ro.temperature, n_micro_lp, rules,
                                                                 ro.top_k, ro.top_p, first_target=P,
                                                                 group=self.group),
                                           in_shardings=(p_sh, full_sh, full_sh))
        self.n_micro_lp = n_micro_lp
        # dynamic batching: chunks cut to their rows' widths (rl_lengths), else every row at the full T columns
        self.chunked = (rl_lengths.ChunkedPasses(cfg, optimizer, config, mesh, rules, p_sh, opt_sh, self.group)
                        if config.grpo.length_buckets else None)
        if config.grpo.get("shared_prompt", False) and self.group == 1:
            log.info("grpo.shared_prompt: a microbatch of %d rows does not hold whole groups of %d; every row runs "
                     "its own prompt", self.mb_size // tc.microbatches, self.G)
        self.full_sh = full_sh
        warning = parallel.batch_split_warning(rules, mesh, {
            "train.batch_size (rollout.num_prompts x group_size when 0)": self.mb_size,
            "a microbatch (that / train.microbatches)": self.mb_size // tc.microbatches})
        if warning:
            log.warning(warning)

    # -- rollouts -------------------------------------------------------------------------------------------

    def _prompts_for(self, round_: int) -> list[int]:
        """Indices into the kept prompts for generation round `round_` of the current step: prompt batch
        position + round_ of the seeded epoch order (a pure function of the seed and that batch number)."""
        return batch_indices(len(self.kept), self.per_round, self.config.seed, self.position + round_)

    @property
    def per_round(self) -> int:
        """Prompts per generation round: the prompt batch size that the data position (self.position) counts in."""
        g = self.config.grpo
        return int(np.ceil(self.P * g.batch_multiplier)) if g.dynamic_sampling else self.P

    def generate_round(self, params, step: int, round_: int) -> tuple[Rollouts, dict[str, float]]:
        idx = self._prompts_for(round_)
        prompts = [self.prompt_ids[i] for i in idx for _ in range(self.G)]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step), round_)
        ro = self.config.rollout
        if self.max_turns > 1:
            return self._multi_turn_round(params, idx, prompts, key)
        t0 = time.perf_counter()
        out = sampling.generate(self.cfg, params, prompts, self.sp, key, mesh=self.mesh, rules=self.rules,
                                max_batch_size=ro.max_batch_size or None, sampling_rules=self.sampling_rules,
                                tokenizer=self.tok_bytes)
        t1 = time.perf_counter()
        texts_p = [self.tok.decode(p, skip_special_tokens=False) for p in prompts]
        texts_c = [self.tok.decode(c, skip_special_tokens=True) for c in out.tokens]
        meta = [self.tasks[self.kept[i]].metadata for i in idx for _ in range(self.G)]
        res = score_across_processes(self.env, texts_p, texts_c, meta)  # each process scores its share
        t2 = time.perf_counter()
        rewards = np.asarray(res.rewards, np.float32)
        task_idx = [self.kept[i] for i in idx for _ in range(self.G)]
        times = {"time_generate_s": t1 - t0, "time_score_s": t2 - t1,
                 "time_reshard_s": float(out.stats["reshard_seconds"]),
                 "generated_tokens": float(out.stats["generated_tokens"]),
                 "sampler_compiles": float(out.stats["compiles"])}
        return Rollouts(task_idx, prompts, out.tokens, out.logprobs, out.finish_reasons, rewards,
                        sample_accuracy(res.info, rewards), dict(res.counts),
                        reward_components(res.info, self.missing_said)), times

    def _multi_turn_round(self, params, idx: list[int], prompts: list[list[int]], key: jax.Array
                          ) -> tuple[Rollouts, dict[str, float]]:
        """generate_round for rollout.max_turns > 1 (jaxrl_llm.multiturn): every process plays the same episodes
        (the sampler returns every completion everywhere; the environment steps run on every process)."""
        ro = self.config.rollout
        gen = multiturn.SamplerGenerate(self.cfg, params, self.sp, key, mesh=self.mesh, rules=self.rules,
                                        max_batch_size=ro.max_batch_size or None,
                                        sampling_rules=self.sampling_rules, tokenizer=self.tok_bytes)
        tasks = [self.tasks[self.kept[i]] for i in idx for _ in range(self.G)]
        t0 = time.perf_counter()
        out = multiturn.multi_turn_rollout(
            gen, self.tok, self.env, prompts, [list(t.messages) for t in tasks], [t.metadata for t in tasks],
            max_turns=self.max_turns, max_new_tokens=ro.max_new_tokens, max_total_tokens=self.budget,
            chat_template=run_template(self.config.data))
        elapsed = time.perf_counter() - t0
        times = {"time_generate_s": gen.seconds, "time_score_s": elapsed - gen.seconds,
                 "time_reshard_s": gen.reshard_seconds,
                 "generated_tokens": float(gen.generated_tokens), "sampler_compiles": float(gen.compiles)}
        return Rollouts([self.kept[i] for i in idx for _ in range(self.G)], prompts, out.tokens, out.logprobs,
                        out.finish_reasons, out.rewards, sample_accuracy(out.info, out.rewards), out.counts,
                        reward_components(out.info, self.missing_said), out.loss_masks, out.turns), times

    def collect(self, params, step: int) -> tuple[Rollouts, dict[str, float]]:
        """One step's rollouts from params (the policy's, or `sampling.prepare_params` of them); with dynamic
        sampling, rounds of generation until num_prompts groups with reward spread are found (at most
        grpo.dynamic_sampling_max_rounds; then the batch is completed with spread-less groups, which carry zero
        advantage, and the shortfall is logged).

        Dynamic-sampling metrics, in groups of group_size samples (generated = num_prompts + discarded + excess):
        dynamic_sampling_rounds: generation rounds run; dynamic_sampling_short_groups: spread-less groups that
        filled the batch (0 unless the rounds ran out); dynamic_sampling_discarded_groups: spread-less groups
        generated and not trained on (those that filled the batch are not discarded);
        dynamic_sampling_excess_groups: groups with spread beyond num_prompts, left out (NeMo RL's
        dynamic_sampling_num_discarded_valid_samples, in groups). The returned counts (the env_* metrics) are the
        environment's over every sample scored this step, in every round, discarded ones included: an environment
        reports one count per round, not per sample, so they cannot follow the groups. Each round's counts are
        carried by exactly one part (its kept groups), so filling the batch from the spare parts adds none."""
        g = self.config.grpo
        roll, info = self.generate_round(params, step, 0)
        info["reward_mean_all"] = float(roll.rewards.mean())
        if not g.dynamic_sampling:
            self.position += 1
            return roll, info
        kept, spare, rounds = [], [], 0
        while True:
            # On the scaled, unshaped rewards (NeMo RL): rewards that differ only where the scaling clamps them
            # give the group no spread to learn from.
            keep = grpo.dynamic_sampling_keep(scaled_rewards(roll.rewards, self.config), self.G)
            kept.append(roll.take_groups(np.flatnonzero(keep), self.G))  # carries the round's counts
            spare.append(dataclasses.replace(roll.take_groups(np.flatnonzero(~keep), self.G), counts={}))
            rounds += 1
            have = sum(len(k.tokens) for k in kept) // self.G
            if have >= self.P or rounds >= g.dynamic_sampling_max_rounds:
                break
            roll, more = self.generate_round(params, step, rounds)
            for k in ("time_generate_s", "time_score_s", "time_reshard_s", "generated_tokens", "sampler_compiles"):
                info[k] += more[k]
        self.position += rounds
        good = Rollouts.concat(kept)
        short = max(0, self.P - have)
        if short:
            log.warning("step %d: dynamic sampling found %d of %d groups with reward spread in %d rounds; %d "
                        "spread-less groups fill the batch", step + 1, have, self.P, rounds, short)
            good = Rollouts.concat([good, Rollouts.concat(spare).take_groups(np.arange(short), self.G)])
        spreadless = sum(len(s.tokens) for s in spare) // self.G
        # every sample generated, in every round (each round's kept and spare groups together)
        info["reward_mean_all"] = float(np.concatenate([r.rewards for r in kept + spare]).mean())
        info.update(dynamic_sampling_rounds=float(rounds), dynamic_sampling_short_groups=float(short),
                    dynamic_sampling_discarded_groups=float(spreadless - short),
                    dynamic_sampling_excess_groups=float(max(0, have - self.P)))
        return good.take_groups(np.arange(self.P), self.G), info

    # -- one RL step ----------------------------------------------------------------------------------------

    def step(self, state: dict, ref_params, step: int) -> tuple[dict, dict[str, float]]:
        g = self.config.grpo
        t_start = time.perf_counter()
        # Made ready for the sampler once for all of the step's calls (turns, dynamic-sampling rounds): resharded to
        # rollout.sampling_layout, decode weights built at the first call; dropped before the log-prob and training
        # passes, which need that memory.
        prepared = sampling.prepare_params(self.cfg, state["params"], mesh=self.mesh, rules=self.rules,
                                           sampling_rules=self.sampling_rules)
        roll, info = self.collect(prepared, step)
        info["time_reshard_s"] += prepared.reshard_seconds
        info["time_generate_s"] += prepared.reshard_seconds
        del prepared
        batch, host = prepare_batch(roll, self.config, self.pad)
        if self.group > 1:
            check_shared_prompts(batch, self.group, self.config.data.max_prompt_len)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.chunked:
            lengths = rl_lengths.row_lengths(batch["attention_mask"], self.config.data.max_prompt_len)
            chunks = self.chunked.plan(np.arange(self.R), lengths, self.n_micro_lp)
            ref_fn = functools.partial(self.chunked.logprobs, "reference", chunks)
            policy_fn = functools.partial(self.chunked.logprobs, "policy", chunks)
            ids, attn = batch["input_ids"], batch["attention_mask"]
        else:
            # Every process holds the whole batch (gathered rollouts); each places the rows its devices own.
            ref_fn, policy_fn = self.ref_logprobs, self.policy_logprobs
            ids, attn = (distributed.put_global(batch[k], self.full_sh) for k in ("input_ids", "attention_mask"))
        with jax.set_mesh(self.mesh):
            if g.kl_coef:
                batch["ref_logprobs"] = reference_logprobs(ref_fn, ref_params, ids, attn)
            else:
                batch["ref_logprobs"] = np.zeros_like(batch["sampler_logprobs"])
            t1 = time.perf_counter()
            if g.recompute_old_logprobs:
                batch["old_logprobs"] = distributed.to_host(policy_fn(state["params"], ids, attn))
                metrics.update(logprob_error_metrics(batch))
                if g.logprob_error_threshold is not None:
                    metrics["logprob_error_masked"] = float(mask_logprob_errors(batch, g.logprob_error_threshold))
            else:
                batch["old_logprobs"] = batch["sampler_logprobs"]
            # REINFORCE++ depends on the KL (in the reward) and on the final mask (whitening): redo it when either
            # became known only now; prepare_batch's advantages stand otherwise.
            if g.adv_estimator == "reinforce_plus_plus" and (g.kl_in_reward or g.logprob_error_threshold is not None):
                kl = reward_kl(batch, g.kl_type) if g.kl_in_reward else None
                batch["advantages"] = compute_advantages(self.config, batch["shaped_rewards"], batch["components"],
                                                         batch["loss_mask"], kl)
                valid = batch["loss_mask"] > 0
                host["advantage_abs_mean"] = float(np.abs(batch["advantages"][valid]).mean()) if valid.any() else 0.0
            t2 = time.perf_counter()
            train_m, cells = [], []
            n_mb = self.R // self.mb_size
            order_rng = np.random.default_rng([self.config.seed, step, 0x6A])
            for epoch in range(g.epochs):
                order = np.arange(self.R) if epoch == 0 else shuffled_rows(order_rng, self.R, self.group)
                for j in range(n_mb):
                    rows = order[j * self.mb_size:(j + 1) * self.mb_size]
                    on_policy = jnp.bool_(epoch == 0 and j == 0)
                    if self.chunked:
                        micro = self.chunked.plan(rows, lengths, self.config.train.microbatches)
                        cells.append(rl_lengths.padding_share(micro, *lengths, self.T))
                        state, m_ = self.chunked.update(state, batch, micro, on_policy)
                    else:
                        mb = {k: distributed.put_global(batch[k][rows], self.batch_sh[k]) for k in grpo.BATCH_AXES}
                        state, m_ = self.train_step(state, mb, on_policy)
                    train_m.append(jax.tree.map(distributed.to_host, m_))
            t3 = time.perf_counter()
        metrics.update(reduce_updates(train_m))
        if cells:  # the loss passes' share of the full-width cells run, and the padding share of those
            metrics.update(train_cells_share=float(np.mean([c[0] for c in cells])),  # (train_compiles: this process)
                           train_padding_share=float(np.mean([c[1] for c in cells])),
                           train_compiles=float(len(self.chunked.shapes)))
        gen_time = info.pop("time_generate_s")
        metrics.update(
            **host, gen_tokens_per_s=info["generated_tokens"] / max(gen_time, 1e-9), time_generate_s=gen_time,
            time_reference_s=t1 - t0, time_old_logprobs_s=t2 - t1, time_train_s=t3 - t2,
            time_step_s=time.perf_counter() - t_start, optimizer_updates=float(len(train_m)),
            **{k: v for k, v in info.items() if k != "generated_tokens"},
            **{f"env_{k}": float(v) for k, v in roll.counts.items()})  # every sample scored this step (collect)
        return state, metrics


def run_grpo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """GRPO per the recipe in `workdir` (resuming from its latest checkpoint); returns the last metrics."""
    from jaxrl_llm import environments
    from jaxrl_llm.data.tasks import load_tasks
    from jaxrl_llm.resume import finish_run, prepare_workdir, restore_run, resume_window
    from jaxrl_llm.train import (
        ConfigError,
        build_model,
        check_best_metric,
        check_env_scores_tasks,
        check_step_finite,
        load_run_tokenizer,
        opt_state_shardings,
    )

    check_best_metric_name(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.ShardingRules()
    tokenizer = load_run_tokenizer(config)
    dc = config.data
    tasks = load_tasks(dc.source, dc.num_examples, config.seed, system_prompt=dc.system_prompt or None,
                       instruction=dc.instruction, **dict(dc.get("options", {})))
    env_spec = config.env.to_dict() if hasattr(config.env, "to_dict") else dict(config.env)
    try:
        env = environments.make_environment(env_spec)
    except ValueError as e:
        raise ConfigError(f"env: {e}") from e
    evaluator = ckpt = writer = None
    try:  # up to the loop's own try, an error closes the environments' worker processes (in a notebook, whose
        # interpreter goes on, they outlived a ConfigError)
        check_env_scores_tasks(env, env_spec.get("name"), dc.source, tasks)
        cfg, params = build_model(config, len(tokenizer), mesh, rules)
        budget = multiturn.total_token_budget(config.rollout)
        if dc.max_prompt_len + budget > cfg.max_position_embeddings:
            what = ("rollout.max_new_tokens" if config.rollout.get("max_turns", 1) == 1 else
                    "the multi-turn budget (rollout.max_total_tokens, or when 0 max_new_tokens x max_turns + the "
                    "observations' allowance)")
            raise ConfigError(f"data.max_prompt_len={dc.max_prompt_len} + {what}={budget} is more than the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}: a row could outgrow the model's "
                              "context mid-run; lower them")
        outside = [t for t in config.rollout.stop_token_ids if t >= cfg.vocab_size]
        if outside:
            raise ConfigError(f"rollout.stop_token_ids={tuple(config.rollout.stop_token_ids)}: {outside} outside the "
                              f"model's vocabulary [0, {cfg.vocab_size})")
        cfg = with_tokenizer_ids(cfg, tokenizer)
        updates_per_step = config.grpo.epochs * (config.rollout.num_prompts * config.rollout.group_size
                                                 // (config.train.batch_size or config.rollout.num_prompts
                                                     * config.rollout.group_size))
        opt_kw = dict(config.optimizer)
        opt_kw["warmup_steps"] = opt_kw.get("warmup_steps", 0) * updates_per_step  # warmup counts RL steps
        optimizer, schedule = make_optimizer(max_steps=config.max_steps * updates_per_step, **opt_kw)
        opt_sh = opt_state_shardings(optimizer, params, models.param_shardings(cfg, mesh, rules), mesh)
        runner = GRPORunner(config, cfg, mesh, rules, tokenizer, tasks, env, optimizer, opt_sh)
        try:  # each process picks a step's prompts from its own copy of the tasks
            distributed.check_same_everywhere(
                f"data.source={describe_source(dc.source)!r} (prompts as tokenized)", runner.prompt_ids,
                len(runner.kept))
        except ValueError as e:
            raise DataError(str(e)) from None
        evaluator = _make_evaluator(config, cfg, tokenizer, mesh, rules, runner.tok_bytes)  # (checked before any step)
        ro = config.rollout
        run_meta = {"algorithm": config.algorithm, "seed": config.seed, "num_prompts": ro.num_prompts,
                    "group_size": ro.group_size, "batch_size": config.train.batch_size, "epochs": config.grpo.epochs,
                    "data_rows": len(runner.kept), "prompts_per_round": runner.per_round}
        with jax.set_mesh(mesh):
            opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
            ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef else None
        if ref_params is not None:  # a resume takes model.path's weights again as its reference: the same ones
            run_meta["reference"] = weights_checksum(ref_params)
        if ref_params is not None and config.grpo.get("ref_offload", False):
            ref_params = offload_to_host(ref_params)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # The step counter placed as the jitted step returns it, so the step compiles once, not again at step 2.
        counter = lambda n: distributed.put_global(np.int32(n), replicated)
        state = {"params": params, "opt_state": opt_state, "step": counter(0)}

        is_main = jax.process_index() == 0
        ckpt = prepare_workdir(workdir, cfg, config, tokenizer, default_best_mode="max", run_meta=run_meta)
        items, start = restore_run(ckpt, state)
        if items is not None:
            state = {**items, "step": counter(start * updates_per_step)}
            # (a checkpoint from before prompt_batches was recorded: each step had max_rounds batches to itself)
            rounds = config.grpo.dynamic_sampling_max_rounds if config.grpo.dynamic_sampling else 1
            runner.position = int(ckpt.read_meta(start).get("prompt_batches", start * rounds))
        writer, last = open_run_records(workdir, config, start, is_main, CONSOLE_KEYS)
        window = StepWindow(rates={"gen_tokens_per_s": "time_generate_s"})  # generated tokens over generation time
        resume_window(window, ckpt, workdir, start)
    except BaseException:
        close_all(*(getattr(o, "close", None) for o in (writer, ckpt, env, evaluator)), after_error=True)
        raise
    stop = StopOnSigterm().start()
    # (the validation's environment has worker processes of its own)
    closers = (stop.close, ckpt.close, writer.close, *(getattr(o, "close", None) for o in (env, evaluator)))
    try:
        if start < config.max_steps and jax.process_index() == 0:  # (the first row comes after the compiles)
            log.info("step %d of %d: compiling the sampler and the train step first (the first step takes "
                     "longest)", start + 1, config.max_steps)
        for step in range(start, config.max_steps):
            state, m = runner.step(state, ref_params, step)
            check_step_finite(step + 1, m, ckpt)
            done = step + 1
            writer.step_done(done)
            val = evaluator(state["params"], done) if evaluator else {}
            window.add(m)
            if val or done % config.log_every == 0 or done == config.max_steps:
                last = {**window.take(), **val, "lr": float(schedule(step * updates_per_step))}
                writer.write(done, last)
            check_best_metric(config, val)
            meta = {"step": done, **run_meta, "data_position": done, "prompt_batches": runner.position, **val,
                    "log_window": window.pending()}
            try:
                checkpoint_step(ckpt, stop, done, state, meta, val, config.max_steps)
            except Preempted:  # stopped between two rows: the steps since the last are logged too
                if len(window):
                    writer.write(done, {**window.take(), "lr": float(schedule(step * updates_per_step))})
                raise
    except BaseException:  # the error that stopped the run is the one to say, not one from closing after it
        close_all(*closers, after_error=True)
        raise
    saved = ckpt.summary()
    close_all(*closers)
    finish_run(config, cfg, state["params"], tokenizer, workdir, start, saved)
    return {**last, **{f"data_{k}": v for k, v in runner.prompt_stats.items()}}


def val_k_values(n_samples: int) -> tuple[int, ...]:
    return tuple(k for k in (1, n_samples) if k <= n_samples)


def check_best_metric_name(config: ml_collections.ConfigDict) -> None:
    """checkpoint.best_metric must name a metric the validation returns (checked before any work; the first
    validation checks maj@<k>, which only environments that extract answers give)."""
    from jaxrl_llm.evaluation import metric_names
    from jaxrl_llm.train import ConfigError

    best = config.checkpoint.get("best_metric", "")
    if not best or not config.get("val_every", 0):
        return
    always, maybe = metric_names(val_k_values(config.eval.n_samples))
    names = sorted(f"val_{k}" for k in always | maybe)
    if best not in names:
        raise ConfigError(f"checkpoint.best_metric={best!r} is not among the validation metrics {names}")


def val_batch_size(config: ml_collections.ConfigDict) -> int:
    """The rows GRPO validation samples at a time: rollout.max_batch_size, or a rollout's num_prompts x group_size."""
    ro = config.rollout
    return ro.max_batch_size or ro.num_prompts * ro.group_size


def _make_evaluator(config, cfg, tokenizer, mesh, rules, tok_bytes=None):
    """val_every > 0: evaluate_tasks on config.eval's tasks every val_every steps (and at the last step);
    metrics come back as val_<name>. tok_bytes: the rollouts' token-byte table (rollout.stop_strings), shared."""
    every = config.get("val_every", 0)
    if not every:
        return None
    from jaxrl_llm import environments
    from jaxrl_llm.data.tasks import load_tasks
    from jaxrl_llm.evaluation import evaluate_tasks, scalar_metrics

    ec = config.eval
    tasks = load_tasks(ec.source, ec.num_examples, ec.seed, system_prompt=config.data.system_prompt or None,
                       instruction=config.data.instruction, **dict(ec.get("options", {})))
    env = environments.make_environment(config.env.to_dict())
    try:  # now, not at the first validation (val_every steps in, that step's checkpoint not yet saved)
        environments.check_metadata(env, [t.metadata for t in tasks])
    except ValueError as e:
        from jaxrl_llm.train import ConfigError

        if hasattr(env, "close"):
            env.close()
        raise ConfigError(f"env.name={config.env.get('name')!r} cannot score the validation tasks of eval.source="
                          f"{describe_source(ec.source)!r}: {e}") from None
    stops = rollout_stop_ids(config, cfg, tokenizer)
    sp = sampling.SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=ec.temperature,
                                 top_p=ec.get("top_p", 1.0), top_k=ec.get("top_k", 0), stop_token_ids=stops,
                                 stop_strings=config.rollout.get("stop_strings", ()))
    k_values = val_k_values(ec.n_samples)
    # At most a rollout's rows at a time (rollout.max_batch_size, or one rollout batch when that is 0): what the
    # run's memory is known to hold; one batch of every eval task x sample could need many times the KV cache.
    val_batch = val_batch_size(config)

    def evaluate(params, done: int) -> dict[str, float]:
        if done % every and done != config.max_steps:
            return {}
        res = evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=ec.n_samples, k_values=k_values,
                             sampling_params=sp, rng=jax.random.key(ec.seed), mesh=mesh, rules=rules,
                             max_batch_size=val_batch, max_prompt_len=config.data.max_prompt_len, truncate_prompts=True,
                             keep_completions=False, token_bytes=tok_bytes)  # the rollouts' (same strings)
        return scalar_metrics(res, prefix="val_", per_source=True)  # mixed sources: val_pass@1/<source> too

    evaluate.close = getattr(env, "close", None)
    return evaluate


if __name__ == "__main__":  # a natural guess for GRPO's command, which is train's (the recipe picks the algorithm)
    raise SystemExit("GRPO runs through the training command: python -m jaxrl_llm.train --config configs/grpo_demo.py "
                     "(the recipe's `algorithm` picks it)")
