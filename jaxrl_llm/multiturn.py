"""Multi-turn rollouts (NeMo RL's run_multi_turn_rollout): the policy generates, a multi-turn environment answers
with a reward and either an observation (the next user message) or the end of the episode, the policy generates
again, up to rollout.max_turns turns.

    out = multi_turn_rollout(generate_fn, tokenizer, env, prompt_ids, conversations, metadata, max_turns=4,
                             max_new_tokens=64, max_total_tokens=total_token_budget(config.rollout))
    out.tokens[i]      # everything after sample i's prompt: generated tokens and observation (template) tokens
    out.loss_masks[i]  # 1 on the policy's own generated tokens, 0 on observation tokens
    out.logprobs[i]    # the sampler's log-prob of each generated token, 0 on observation tokens
    out.rewards        # [N] the rewards of all turns summed

Token bookkeeping: generated tokens are appended exactly as sampled (never decoded and re-tokenised), so the
sampler's log-probs stay aligned with them and the training row [pad..., prompt | out.tokens[i], pad...] is exactly
the context each turn was generated from. The assistant message the environment sees is the generated text
without special tokens, a reasoning model's <think> block included (the environment reads its action after it;
an environment whose step takes `prompts` also gets the decoded end of the row each reply continues, where a
generation prompt may have opened the block). Earlier turns' reasoning therefore stays in the row as sampled and
the policy sees it at later turns (as in NeMo RL's message log); a template that renders earlier turns otherwise
(Qwen3's drops their reasoning and gives the last reply an empty think block) is refused by `observation_delta`.
Between turns the row gets the chat template's delta (`observation_delta`): what closes
the assistant turn (e.g. ChatML's "<|im_end|>\\n"; only the part the generation did not already end with, so a
reply cut by the token limit is closed too), the user message and the next generation prompt, tokenised on its
own with add_special_tokens=False.

Budget: the tokens after the prompt (generated + observations) never exceed max_total_tokens
(`total_token_budget`). Each turn generates at most min(max_new_tokens, what is left). An observation that leaves
no room for at least one generated token is not appended: the episode ends, truncated. Endings (counted as
"ended_done", "ended_max_turns", "ended_truncated"; per sample in info "episode_end"): the environment says done,
max_turns is reached, or the budget is spent. The finish reason is "length" when the episode was cut by the budget
(an observation did not fit, or its last generation hit its token limit), else "stop": reaching max_turns without
done is not a truncation (as NeMo RL, which marks truncation by length only); the summed reward already tells it.

Every process of a multi-host job runs this loop with the same inputs (the sampler returns every completion to
every process and the environment must be deterministic), so all processes make the same sampler calls in the
same order.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrl_llm import sampling
from jaxrl_llm.environments.extract import THINK_CLOSE, THINK_OPEN
from jaxrl_llm.environments.multiturn import MultiTurnEnvironment, check_turn_result, is_multi_turn

OBSERVATION_TOKENS = 32  # default room per observation when rollout.max_total_tokens is 0
PROMPT_TAIL_TOKENS = 16  # the end of each turn's row decoded for an environment's step(prompts=...)


class Generation(NamedTuple):
    """What a generate function returns for its prompts: tokens (the stop token included when hit), the
    sampler's log-prob of each token, and finish reasons ("stop" | "length")."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]


# generate_fn(prompt_ids of the active samples, max_new_tokens per prompt, turn index from 0) -> Generation
GenerateFn = Callable[[list[list[int]], list[int], int], Generation]


@dataclasses.dataclass
class MultiTurnOutput:
    """Per sample i (N in all): tokens[i], loss_masks[i] and logprobs[i] are aligned (everything after the prompt);
    finish_reasons[i] "stop" | "length"; rewards [N] float32 summed over turns; info[i]: the environment's info of
    the last turn plus "turns" and "episode_end" (done | max_turns | truncated); counts: the environment's counts
    summed over turns plus the endings; turns[i]: generations made; conversations[i]: the chat as played."""

    tokens: list[list[int]]
    loss_masks: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    rewards: np.ndarray
    info: list[dict[str, Any]]
    counts: dict[str, int]
    turns: list[int]
    conversations: list[list[dict[str, str]]]


def total_token_budget(rollout: Any) -> int:
    """Tokens after the prompt in a training row: rollout.max_total_tokens, or when it is 0 (the default)
    max_new_tokens x max_turns + OBSERVATION_TOKENS x (max_turns - 1), which is max_new_tokens for one turn."""
    turns = int(rollout.get("max_turns", 1))
    budget = int(rollout.get("max_total_tokens", 0))
    return budget or rollout.max_new_tokens * turns + OBSERVATION_TOKENS * (turns - 1)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool,
           chat_template: str | None = None) -> str:
    """The chat template's text of `messages` (no tokenisation)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def observation_delta(tokenizer: Any, conversation: Sequence[dict[str, str]], generated_ids: Sequence[int],
                      observation: str, chat_template: str | None = None) -> str:
    """The text to append to a row ending with the assistant's generated tokens so that it holds the conversation
    plus the user message `observation` and the next generation prompt.

    conversation: the chat so far, ending with the assistant message (its content: the generated text without
    special tokens). generated_ids: the generated tokens (e.g. ending with "<|im_end|>" when the model stopped).
    The template renders the conversation with (A) and without (H, plus the generation prompt) the assistant
    message, and with the observation and the next generation prompt (B); the delta is the assistant turn's
    closing text (A after H and the content) minus the part the generated ids already end with, then B after A.
    That part is matched on token ids: a reply cut by the token limit right after a "<" has not begun
    "<|im_end|>". ValueError when the template does not render earlier turns unchanged."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("observation_delta: the conversation must end with the assistant message")
    content = conversation[-1]["content"]
    head = render(tokenizer, conversation[:-1], True, chat_template)
    with_reply = render(tokenizer, conversation, False, chat_template)
    nxt = render(tokenizer, [*conversation, {"role": "user", "content": observation}], True, chat_template)
    # Qwen3's template drops the reasoning of earlier replies and gives the last an empty think block; DeepSeek-R1's
    # opens one in the generation prompt and renders replies without it: both rewrite what was sampled.
    thinks = any(t in head + with_reply + nxt for t in (THINK_OPEN, THINK_CLOSE))
    hint = (" (this one rewrites the reply's <think> block, as Qwen3's and DeepSeek-R1's templates do; the rollout "
            "keeps the reasoning as sampled)") if thinks else ""
    if not with_reply.startswith(head):
        raise ValueError("the chat template renders the conversation with the assistant's reply differently from "
                         "the prompt it was generated from (it does not start with it); multi-turn rollouts need a "
                         f"template that keeps earlier turns unchanged (data.chat_template){hint}")
    tail = with_reply[len(head):]
    close = next((tail[len(c):] for c in (content, content.strip()) if tail.startswith(c)), None)
    if close is None:
        raise ValueError(f"the chat template does not render the assistant's reply {content[:60]!r} verbatim after "
                         f"the generation prompt; multi-turn rollouts need it to (data.chat_template){hint}")
    if not nxt.startswith(with_reply):
        raise ValueError("the chat template renders the conversation plus the environment's message differently "
                         "from the conversation alone (it is not a prefix); multi-turn rollouts need a template that "
                         f"keeps earlier turns unchanged (data.chat_template){hint}")
    close_ids = [int(t) for t in tokenizer.encode(close, add_special_tokens=False)]
    generated_ids = [int(t) for t in generated_ids]
    done = 0
    for m in range(min(len(close_ids), len(generated_ids)), 0, -1):
        if generated_ids[-m:] == close_ids[:m]:
            skipped = tokenizer.decode(close_ids[:m], skip_special_tokens=False)
            if close.startswith(skipped):
                done = len(skipped)
                break
    return close[done:] + nxt[len(with_reply):]


def _check_generation(gen: Generation, caps: list[int], turn: int) -> None:
    if not (len(gen.tokens) == len(gen.logprobs) == len(gen.finish_reasons) == len(caps)):
        raise ValueError(f"turn {turn + 1}: generate_fn returned {len(gen.tokens)} completions, "
                         f"{len(gen.logprobs)} log-prob lists and {len(gen.finish_reasons)} finish reasons for "
                         f"{len(caps)} prompts")
    for j, (t, lp, cap) in enumerate(zip(gen.tokens, gen.logprobs, caps, strict=True)):
        if len(t) != len(lp) or len(t) > cap:
            raise ValueError(f"turn {turn + 1}, prompt {j}: generate_fn returned {len(t)} tokens and {len(lp)} "
                             f"log-probs with a limit of {cap} tokens")


def multi_turn_rollout(generate_fn: GenerateFn, tokenizer: Any, env: MultiTurnEnvironment,
                       prompt_ids: Sequence[Sequence[int]], conversations: Sequence[Sequence[dict[str, str]]],
                       metadata: Sequence[dict[str, Any]], *, max_turns: int, max_new_tokens: int,
                       max_total_tokens: int, chat_template: str | None = None) -> MultiTurnOutput:
    """Plays N episodes of at most `max_turns` turns (see the module docstring). prompt_ids[i]: the templated
    prompt's ids (generation prompt included) of conversations[i] (the task's messages); metadata[i]: what the
    environment needs. The environment's `step` sees the still-active samples only."""
    n = len(prompt_ids)
    if not (len(conversations) == len(metadata) == n):
        raise ValueError(f"multi_turn_rollout: {n} prompts, {len(conversations)} conversations and {len(metadata)} "
                         "metadata entries; expected one of each per sample")
    if not is_multi_turn(env):
        raise ValueError(f"environment {getattr(env, 'name', type(env).__name__)!r} has no step() method: it scores "
                         "single completions only, so it cannot play episodes of several turns")
    if len(inspect.signature(env.step).parameters) < 3:
        raise ValueError(f"environment {getattr(env, 'name', type(env).__name__)!r}: step() must take "
                         "(conversations, metadata, turns); turns[i] is the 1-based turn of conversation i")
    if max_turns < 1 or max_new_tokens < 1 or max_total_tokens < max_new_tokens:
        raise ValueError(f"multi_turn_rollout: need max_turns >= 1, max_new_tokens >= 1 and max_total_tokens >= "
                         f"max_new_tokens, got {max_turns}, {max_new_tokens}, {max_total_tokens}")
    takes_prompts = "prompts" in inspect.signature(env.step).parameters
    after: list[list[int]] = [[] for _ in range(n)]
    masks: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    convs = [[dict(m) for m in c] for c in conversations]
    rewards = np.zeros(n, np.float32)
    info: list[dict[str, Any]] = [{} for _ in range(n)]
    finish, turns = [""] * n, [0] * n
    counts = {"ended_done": 0, "ended_max_turns": 0, "ended_truncated": 0}
    active = list(range(n))
    for turn in range(max_turns):
        if not active:
            break
        caps = [min(max_new_tokens, max_total_tokens - len(after[i])) for i in active]
        rows = [[*prompt_ids[i], *after[i]] for i in active]
        gen = generate_fn(rows, caps, turn)
        _check_generation(gen, caps, turn)
        for j, i in enumerate(active):
            toks = [int(t) for t in gen.tokens[j]]
            after[i] += toks
            masks[i] += [1] * len(toks)
            lps[i] += [float(x) for x in gen.logprobs[j]]
            turns[i] += 1
            convs[i].append({"role": "assistant", "content": tokenizer.decode(toks, skip_special_tokens=True)})
        step_kw = {}
        if takes_prompts:  # the end of the text each reply continues: a generation prompt may open <think>
            step_kw["prompts"] = [tokenizer.decode(row[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
                                  for row in rows]
        res = env.step([convs[i] for i in active], [metadata[i] for i in active], [turns[i] for i in active],
                       **step_kw)
        check_turn_result(res, len(active), env.name)
        for k, v in res.counts.items():
            counts[k] = counts.get(k, 0) + int(v)
        still = []
        for j, i in enumerate(active):
            rewards[i] += float(res.rewards[j])
            cut = gen.finish_reasons[j] == "length"
            end = "done" if res.done[j] else "max_turns" if turn == max_turns - 1 else None
            if end is None:
                try:
                    text = observation_delta(tokenizer, convs[i], gen.tokens[j], res.observations[j], chat_template)
                except ValueError as e:
                    raise ValueError(f"sample {i}, turn {turn + 1}: {e}") from e
                delta = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
                if len(after[i]) + len(delta) + 1 > max_total_tokens:  # no room for the observation and an answer
                    end, cut = "truncated", True
                else:
                    after[i] += delta
                    masks[i] += [0] * len(delta)
                    lps[i] += [0.0] * len(delta)
                    convs[i].append({"role": "user", "content": res.observations[j]})
                    still.append(i)
            info[i] = {**res.info[j], "turns": turns[i]}
            if end is not None:
                info[i]["episode_end"] = end
                counts[f"ended_{end}"] += 1
                finish[i] = "length" if cut else "stop"
        active = still
    return MultiTurnOutput(after, masks, lps, finish, rewards, info, counts, turns, convs)


class SamplerGenerate:
    """The generate function of GRPO's multi-turn rollouts: `sampling.generate` on the trainer's arrays with
    `sampling_params` (max_new_tokens replaced per prompt by the turn's limit) and the key fold_in(key, turn);
    generate_kw go to `sampling.generate` (mesh, rules, max_batch_size, sampling_rules). Sums seconds, generated
    tokens, sampler compiles and parameter reshard seconds over its calls. params may be `sampling.prepare_params`
    of the policy's (GRPO's are): resharded and laid out for decode once for all turns, not at every turn."""

    def __init__(self, cfg: Any, params: Any, sampling_params: sampling.SamplingParams, key: jax.Array,
                 **generate_kw: Any):
        self.cfg, self.params, self.sp, self.key, self.kw = cfg, params, sampling_params, key, generate_kw
        self.seconds, self.generated_tokens, self.compiles, self.reshard_seconds = 0.0, 0, 0, 0.0

    def __call__(self, prompt_ids: list[list[int]], max_new_tokens: list[int], turn: int) -> Generation:
        sps = [dataclasses.replace(self.sp, max_new_tokens=int(m)) for m in max_new_tokens]
        t0 = time.perf_counter()
        out = sampling.generate(self.cfg, self.params, prompt_ids, sps, jax.random.fold_in(self.key, turn),
                                **self.kw)
        self.seconds += time.perf_counter() - t0
        self.generated_tokens += int(out.stats["generated_tokens"])
        self.compiles += int(out.stats["compiles"])
        self.reshard_seconds += float(out.stats["reshard_seconds"])
        return Generation(out.tokens, out.logprobs, out.finish_reasons)
