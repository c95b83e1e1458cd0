"""Static model configuration: a frozen, hashable dataclass built from (and written back to) HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

# HF `architectures[0]` -> our family name. The family decides the defaults of the HF config keys.
CAUSAL_LM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SEQ_CLS_ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_ARCHITECTURES = tuple(CAUSAL_LM_ARCHITECTURES) + tuple(SEQ_CLS_ARCHITECTURES)

DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}
ATTENTION_IMPLS = ("xla", "fused")


class UnsupportedModelError(ValueError):
    """A config.json or GGUF file describes a model this library cannot build."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """'bf16' | 'bfloat16' | jnp.bfloat16 | np.dtype -> a jnp dtype; anything else is a clear error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from e
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"unsupported parameter dtype {dt}; expected float32, bfloat16 or float16")
    return dt


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: rope_type in {'llama3', 'linear', 'dynamic'}."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything static about a decoder-only transformer. Hashable: safe as a jit static argument.

    `compute_dtype` and `attention_impl` are run-time choices (not architecture); change them with
    `dataclasses.replace(cfg, compute_dtype="bfloat16")`.
    """

    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # None: what the family implies (see _family_defaults); resolved to a bool on construction.
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool | None = None
    sliding_window: int | None = None
    num_labels: int = 0  # > 0: a scalar/classification head `score` (reward model, value model)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    compute_dtype: str = "float32"
    attention_impl: str = "xla"  # xla: plain einsum softmax; fused: jax.nn.dot_product_attention
    remat: bool = False  # rematerialise each layer in the backward pass
    # > 0: losses project onto the vocabulary this many positions at a time (`logit_chunks`), so the fp32 logits
    # of a whole microbatch never exist at once; 0: all positions at once
    logits_chunk: int = 0

    def __post_init__(self):
        if self.family not in MODEL_TYPES:
            raise UnsupportedModelError(f"unknown model family {self.family!r}; supported: {sorted(MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim}: must be even (RoPE rotates pairs of dimensions)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        resolve_dtype(self.compute_dtype)
        if isinstance(self.logits_chunk, bool) or not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ValueError(f"logits_chunk={self.logits_chunk!r}: must be an integer >= 0 (0: no chunking)")
        for name, value in _family_defaults(self).items():
            object.__setattr__(self, name, value)

    @property
    def dtype(self) -> jnp.dtype:
        return resolve_dtype(self.compute_dtype)


# What an HF config.json of each family can say about the optional parts of the model (transformers 4.x/5.x):
#   llama:   attention_bias (q, k, v and o biases together), mlp_bias; no QK-norm, no sliding window
#   mistral: no biases, no QK-norm; sliding_window
#   qwen2:   q/k/v biases always, never an o bias; no MLP bias, no QK-norm (sliding windows: unsupported here)
#   qwen3:   q/k norm always; attention_bias (q, k, v and o biases together); no MLP bias
def _family_defaults(cfg: ModelConfig) -> dict[str, bool]:
    """The flags left at None, filled in with what cfg.family implies (given the flags that were set)."""
    fam = cfg.family
    out: dict[str, bool] = {}
    if cfg.qkv_bias is None:
        out["qkv_bias"] = (fam == "qwen2" or (fam in ("llama", "qwen3") and bool(cfg.o_bias)))
    if cfg.o_bias is None:
        out["o_bias"] = fam in ("llama", "qwen3") and bool(out.get("qkv_bias", cfg.qkv_bias))
    if cfg.mlp_bias is None:
        out["mlp_bias"] = False
    if cfg.qk_norm is None:
        out["qk_norm"] = fam == "qwen3"
    return {k: bool(v) for k, v in out.items()}


def hf_inexpressible(cfg: ModelConfig) -> list[str]:
    """Why no HF config.json of cfg.family describes this model (empty: config_to_hf describes it exactly)."""
    fam, name = cfg.family, _HF_ARCH[cfg.family]
    bad = []
    if fam in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        bad.append(f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias}: {name}'s attention_bias sets the q/k/v and "
                   "o biases together")
    if fam == "mistral":
        bad += [f"{k}=True: {name} has no such parameters" for k in ("qkv_bias", "o_bias") if getattr(cfg, k)]
    if fam == "qwen2":
        if not cfg.qkv_bias:
            bad.append(f"qkv_bias=False: {name} always has q/k/v biases")
        if cfg.o_bias:
            bad.append(f"o_bias=True: {name} never has an o_proj bias")
    if cfg.mlp_bias and fam != "llama":
        bad.append(f"mlp_bias=True: {name} has no MLP biases (only llama's mlp_bias)")
    if fam == "qwen3" and not cfg.qk_norm:
        bad.append(f"qk_norm=False: {name} always has q/k norms")
    if fam != "qwen3" and cfg.qk_norm:
        bad.append(f"qk_norm=True: {name} has no q/k norms (family qwen3 has)")
    if fam != "mistral" and cfg.sliding_window:
        bad.append(f"sliding_window={cfg.sliding_window}: only family mistral exports a sliding window")
    return bad


def _first(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


# What transformers' config classes assume for keys a config.json leaves out, where it differs by family (read
# from their constructors): the same file must mean the same model here.
_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(max_position_embeddings=131072, num_key_value_heads=8, head_dim=None, sliding_window=4096,
                    bos_token_id=1, eos_token_id=2),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=None, bos_token_id=None,
                  eos_token_id=None),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128, bos_token_id=None,
                  eos_token_id=None),
}


def _rope_scaling_from_hf(rs: dict | None, where: str, d: dict, max_pos: int) -> RopeScaling | None:
    """llama3's pretraining context as transformers reads it: a top-level original_max_position_embeddings first,
    then the scaling dict's, then max_position_embeddings."""
    if not rs:
        return None
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("llama3", "linear", "dynamic"):
        raise UnsupportedModelError(
            f"{where}: rope_scaling type {rope_type!r} is not supported (supported: llama3, linear, dynamic)"
        )
    factor = rs.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
        raise UnsupportedModelError(f"{where}: rope_scaling type {rope_type!r} needs a factor > 0 (got {factor!r}); "
                                    "transformers refuses it too")
    if rope_type == "llama3":  # (transformers 4.x and 5.x refuse a llama3 scaling without them too)
        bad = [k for k in ("low_freq_factor", "high_freq_factor") if isinstance(rs.get(k), bool)
               or not isinstance(rs.get(k), int | float) or not rs[k] > 0]
        if bad:
            raise UnsupportedModelError(f"{where}: rope_scaling type 'llama3' needs {' and '.join(bad)} > 0 (got "
                                        f"{', '.join(f'{k}={rs.get(k)!r}' for k in bad)})")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),  # (given, for llama3: the only type that reads them)
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(_first(d, "original_max_position_embeddings", default=_first(
            rs, "original_max_position_embeddings", default=max_pos))),
    )


def _sliding_window(d: dict, family: str, num_layers: int, max_pos: int, where: str) -> int | None:
    """The window every layer slides over (None: full attention) as transformers reads config.json: Mistral's
    sliding_window (absent: its 4096; an explicit null: none), on every layer unless `layer_types` names each
    layer's (transformers then builds it as Ministral); Qwen's only with use_sliding_window=true, on the layers
    from max_window_layers on unless layer_types says. A window that binds on some layers only (or on Qwen's) is
    refused; one of max_position_embeddings or more never binds and is left out."""
    if family == "mistral":  # an absent key is transformers' default window; an explicit null is none
        window = d.get("sliding_window", _FAMILY_DEFAULTS["mistral"]["sliding_window"])
    elif family in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
        window = d.get("sliding_window", 4096)
    else:
        return None
    types = d.get("layer_types")
    if types is None and family != "mistral":
        first = _first(d, "max_window_layers", default=28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types is not None and (not isinstance(types, list) or len(types) != num_layers
                              or not set(types) <= {"full_attention", "sliding_attention"}):
        raise UnsupportedModelError(f"{where}: layer_types={types!r}: expected {num_layers} entries, each "
                                    "'full_attention' or 'sliding_attention'")
    mixed = types is not None and "full_attention" in types
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if window >= max_pos and (mixed or family != "mistral"):  # (Mistral's own window: kept, as config.json says)
        return None
    if family != "mistral":
        raise UnsupportedModelError(f"{where}: use_sliding_window=true (sliding_window={window} on "
                                    f"{types.count('sliding_attention')} of {num_layers} layers) is not supported for "
                                    f"{family}")
    if mixed:
        raise UnsupportedModelError(f"{where}: layer_types mixes sliding_attention (sliding_window={window}) and "
                                    "full_attention layers (Ministral's interleaved attention): not supported")
    return window


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an HF config dict. `where` names the source in error messages."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is not None and arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = CAUSAL_LM_ARCHITECTURES.get(arch) or SEQ_CLS_ARCHITECTURES.get(arch) or MODEL_TYPES.get(
        d.get("model_type", "")
    )
    if family is None:
        raise UnsupportedModelError(
            f"{where}: model_type {d.get('model_type')!r} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    quant = d.get("quantization_config")
    if quant:  # its weights are packed integers / fp8 with scales beside them: read as floats they are garbage
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise UnsupportedModelError(f"{where}: quantization_config (quant_method={method!r}): quantized checkpoints "
                                    "are not supported; use the unquantized (bf16/fp16/fp32) model")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in required if k not in d]
    if missing:
        raise UnsupportedModelError(f"{where}: missing required keys {missing}")
    for k in [*required, "head_dim", "num_key_value_heads"]:
        v = d.get(k)
        if (k in required or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UnsupportedModelError(f"{where}: {k}={v!r}: must be a positive integer")
    for k in ("rope_scaling", "rope_parameters"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            raise UnsupportedModelError(f"{where}: {k}={d[k]!r}: must be an object (or null)")
    num_heads = int(d["num_attention_heads"])
    fam = _FAMILY_DEFAULTS[family]
    head_dim = _first(d, "head_dim", default=fam["head_dim"] or int(d["hidden_size"]) // num_heads)
    max_pos = int(_first(d, "max_position_embeddings", default=fam["max_position_embeddings"]))
    # transformers >= 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta` + `rope_scaling`; either may
    # name the type with the older key "type".
    rope = d.get("rope_parameters") or {}
    rope_theta = _first(rope, "rope_theta", default=_first(d, "rope_theta", default=10000.0))
    rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else d.get("rope_scaling")
    for k, v in (("rope_theta", rope_theta), ("rms_norm_eps", _first(d, "rms_norm_eps", default=1e-6))):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise UnsupportedModelError(f"{where}: {k}={v!r}: must be a finite number > 0")
    eos = d.get("eos_token_id", fam["eos_token_id"])
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
    attention_bias = bool(d.get("attention_bias", False))
    sliding = _sliding_window(d, family, int(d["num_hidden_layers"]), max_pos, where)
    num_labels = 0
    if arch in SEQ_CLS_ARCHITECTURES:
        num_labels = int(d.get("num_labels", len(d.get("id2label", {})) or 2))
    scaling = _rope_scaling_from_hf(rope_scaling, where, d, max_pos)
    legacy = d.get("rope_scaling")
    if rope and legacy:  # transformers (>= 5) then reads rope_scaling alone: rope_theta from it or beside it, or 10000
        theirs = (_first(legacy, "rope_theta", default=_first(d, "rope_theta", default=10000.0)),
                  _rope_scaling_from_hf(legacy, where, d, max_pos))
        if theirs != (rope_theta, scaling):
            raise UnsupportedModelError(
                f"{where}: rope_parameters and rope_scaling are both set and disagree: rope_theta={rope_theta} with "
                f"scaling {scaling and scaling.to_hf()} here; transformers reads rope_scaling alone (theta from it or "
                f"rope_theta, else 10000): rope_theta={theirs[0]} with scaling {theirs[1] and theirs[1].to_hf()}; "
                "keep one of the two")
    try:
        return ModelConfig(
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            # an explicit null means one kv head per query head, as transformers reads it; an absent key the family's
            num_kv_heads=int(num_heads if "num_key_value_heads" in d and d["num_key_value_heads"] is None else
                             _first(d, "num_key_value_heads", default=fam["num_key_value_heads"] or num_heads)),
            head_dim=int(head_dim),
            rms_norm_eps=float(_first(d, "rms_norm_eps", default=1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or (attention_bias and family in ("llama", "qwen3")),  # as transformers reads it
            o_bias=attention_bias and family in ("llama", "qwen3"),
            mlp_bias=bool(d.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            num_labels=num_labels,
            bos_token_id=d.get("bos_token_id", fam["bos_token_id"]),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )
    except UnsupportedModelError as e:  # (num_key_value_heads that do not divide the heads, an odd head_dim)
        absent = [k for k in ("num_key_value_heads", "head_dim") if k not in d and k in str(e)]
        raise UnsupportedModelError(f"{where}: {e}" + (f" ({', '.join(absent)} absent: transformers' {family} "
                                                       "default)" if absent else "")) from None


_HF_ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF config.json dict that transformers loads into the same architecture.

    Raises UnsupportedModelError (a ValueError) for a config no HF config of its family describes (see
    hf_inexpressible; train writes model_config.json up front, so a run fails before training): written anyway,
    transformers (and load_pretrained) would build a different model from it."""
    bad = hf_inexpressible(cfg)
    if bad:
        raise UnsupportedModelError(f"ModelConfig(family={cfg.family!r}) cannot be written as an HF "
                                    f"{_HF_ARCH[cfg.family]} config: {'; '.join(bad)}")
    arch = _HF_ARCH[cfg.family] + ("ForSequenceClassification" if cfg.num_labels else "ForCausalLM")
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.to_hf() if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype,  # what transformers 4.x writes and reads
        "dtype": torch_dtype,  # what transformers 5 writes (it still reads torch_dtype); vLLM reads either
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family in ("llama", "qwen3"):
        d["attention_bias"] = cfg.o_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    if cfg.num_labels:
        d["num_labels"] = cfg.num_labels
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return d
