"""The sampler: KV cache, prefill/decode, sampling strategies and the jitted generate loop.

    out = sampling.generate(cfg, params, prompts, sampling.SamplingParams(max_new_tokens=64, temperature=1.0,
                            top_p=1.0, top_k=0, stop_token_ids=(eos,)), rng)
    out.tokens, out.logprobs, out.finish_reasons, out.stats
"""

from jaxrl_llm.sampling.cache import CACHE_AXES, cache_bytes, cache_shardings, init_cache
from jaxrl_llm.sampling.generate import GenerateOutput, PreparedParams, PromptLengthError, generate, prepare_params
from jaxrl_llm.sampling.loop import compile_count, compile_counts
from jaxrl_llm.sampling.request import SamplingParams
from jaxrl_llm.sampling.stop_strings import TokenBytes, token_bytes
from jaxrl_llm.sampling.strategies import (
    RowSampler,
    filter_top_k_top_p,
    process_logits,
    scale_by_temperature,
    token_logprobs,
)
from jaxrl_llm.sampling.text import TextOutput, default_stop_ids, generate_text

__all__ = [
    "CACHE_AXES",
    "GenerateOutput",
    "PreparedParams",
    "PromptLengthError",
    "RowSampler",
    "SamplingParams",
    "TextOutput",
    "TokenBytes",
    "cache_bytes",
    "cache_shardings",
    "compile_count",
    "compile_counts",
    "default_stop_ids",
    "filter_top_k_top_p",
    "generate",
    "generate_text",
    "init_cache",
    "prepare_params",
    "process_logits",
    "scale_by_temperature",
    "token_bytes",
    "token_logprobs",
]
