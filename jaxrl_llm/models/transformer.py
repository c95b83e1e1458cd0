"""The decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3) as pure functions of (cfg, params).

Shape suffixes: B batch, T query length, S key length, D model width, N query heads, K kv heads,
G = N // K (query heads per kv head), H head dim, F MLP width, V vocab, C score-head outputs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.decode_layout import INPUT_AXES, SUFFIX, is_decode_params, project
from jaxrl_llm.models.params import check_params
from jaxrl_llm.models.sdpa import gqa_attention
from jaxrl_llm.models.swiglu import swiglu
from jaxrl_llm.parallel.rules import ShardingRules, constrain

_F32 = jnp.float32
# Logical axes of the KV cache arrays {"k", "v"} that `forward_with_cache` reads and writes.
CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")
# The per-layer keys of the unrolled decode loop (`forward_with_cache` with per-layer lists) lie transposed,
# [B, K, H, S], so that both attention products of a decode step are plain matrix products (see
# `attention_kt`); the per-layer values keep [B, K, S, H].
KEYS_T_AXES = ("batch", "kv_heads", "head_dim", "length")


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF semantics: normalise in fp32, cast back to the input dtype, then scale."""
    xf = x.astype(_F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [H/2] in fp32, with Llama 3 / linear / dynamic-NTK scaling."""
    H = cfg.head_dim
    exps = jnp.arange(0, H, 2, dtype=_F32) / H
    inv = 1.0 / (cfg.rope_theta**exps)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        mid = (1 - smooth) * inv / rs.factor + smooth * inv
        out = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_mid, mid, out)
    if rs.rope_type == "dynamic":
        # Dynamic NTK: grow the base once the sequence exceeds the trained context.
        max_pos = cfg.max_position_embeddings
        if seq_len is None:
            return inv
        L = jnp.maximum(seq_len.astype(_F32), float(max_pos))
        base = cfg.rope_theta * ((rs.factor * L / max_pos) - (rs.factor - 1)) ** (H / (H - 2))
        scaled = 1.0 / (base**exps)
        return jnp.where(seq_len > max_pos, scaled, inv)
    raise ValueError(f"rope type {rs.rope_type!r}")


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, H/2] fp32 of the rotary angles at these positions, computed once per forward and shared
    by every layer's q and k (a layer scan reads them as loop constants). In an unrolled layer loop XLA fuses the
    cosine and sine into every layer's rotation and evaluates them again per head and layer; the sampler's decode
    loop therefore builds one table of the cache's positions before the loop and passes each step's rows to
    `forward_with_cache(rope=...)`. Dynamic NTK takes its length from the longest position of the whole batch, as
    transformers does: past max_position_embeddings a row's result then depends on its batch (and a cached
    decode on when each key was cached), which keeps logits equal to transformers' on the same batch."""
    inv_freq = rope_inv_freq(cfg, jnp.max(positions_BT) + 1)
    freqs_BTh = positions_BT.astype(_F32)[..., None] * inv_freq
    return jnp.cos(freqs_BTh), jnp.sin(freqs_BTh)


def apply_rope(x_BTNH: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE (HF layout: the two halves of the head dim are the pair); rope = `rope_tables(...)`."""
    cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(_F32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """0, 1, 2, ... over the valid tokens of each row; pads get 0 (left and right padding both work)."""
    m = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def attention_mask_BTS(
    cfg: ModelConfig,
    attention_mask_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, T]: causal, key valid, same segment, inside the sliding window.

    Every query may always see itself, so rows of padding never produce NaN (their outputs are unused).
    """
    T = attention_mask_BT.shape[1]
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    allowed = (k <= q)[None]
    allowed = allowed & attention_mask_BT.astype(bool)[:, None, :]
    if segment_ids_BT is not None:
        allowed = allowed & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    if cfg.sliding_window is not None:
        allowed = allowed & ((q - k) < cfg.sliding_window)[None]
    return allowed | jnp.eye(T, dtype=bool)[None]


def attention(cfg: ModelConfig, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
              mask_BTS: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads; softmax in fp32. Returns [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = 1.0 / math.sqrt(H)
    if cfg.attention_impl == "fused":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale)
    # The backward pass recomputes the probabilities instead of storing them (models/sdpa.py).
    o_BTKGH = gqa_attention(q_BTNH.reshape(B, T, K, N // K, H), k_BSKH, v_BSKH, mask_BTS)
    return o_BTKGH.reshape(B, T, N, H)


def attention_kv_major(cfg: ModelConfig, q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                       mask_BTS: jax.Array) -> jax.Array:
    """`attention` against a KV cache stored kv-head-major ([B, K, S, H]). Returns [B, T, N, H].

    The cache is read as it lies: (B, K) lead every operand and the cache is the left operand of the score
    product (contracting its last axis) and the right operand of the value product (contracting its first
    non-batch axis), the layouts XLA's CPU dots take without copying; only the small query and score arrays
    are transposed."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H)
    if cfg.attention_impl == "fused":
        k_BSKH, v_BSKH = k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale)
    q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # Q = (G, T)
    s_BKSQ = jnp.einsum("bksh,bkqh->bksq", k_BKSH, q_BKQH, preferred_element_type=_F32) * scale
    s_BKGTS = s_BKSQ.reshape(B, K, S, G, T).transpose(0, 1, 3, 4, 2)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(_F32).min)
    p_BKQS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BKSH.dtype).reshape(B, K, G * T, S)
    o_BKQH = jnp.einsum("bkqs,bksh->bkqh", p_BKQS, v_BKSH)
    return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def attention_kt(cfg: ModelConfig, q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                 mask_BTS: jax.Array) -> jax.Array:
    """`attention_kv_major` with the keys stored transposed ([B, K, H, S]). Returns [B, T, N, H].

    Per (row, kv head) the scores are then q [G·T, H] @ k [H, S] and the output p [G·T, S] @ v [S, H]: both
    contract the left operand's last axis with the right operand's first, and the scores come out with S last,
    where the softmax reduces. With the keys [S, H] XLA:CPU forms the scores transposed and copies them. On the
    2-core AVX-512 CPU of benchmarks/README.md a SmolLM2-135M decode step's attention took 73 instead of 98 µs a
    layer at batch 8 and 843 instead of 923 at batch 32 (a 128-slot cache), measured in isolation; the whole
    batch-32 decode step went from 105.0-105.8 to 103.4-103.7 ms."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    G = N // K
    if cfg.attention_impl == "fused":
        return attention_kv_major(cfg, q_BTNH, k_BKHS.transpose(0, 1, 3, 2), v_BKSH, mask_BTS)
    q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # Q = (G, T)
    s_BKQS = jnp.einsum("bkqh,bkhs->bkqs", q_BKQH, k_BKHS, preferred_element_type=_F32) * (1.0 / math.sqrt(H))
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKQS.reshape(B, K, G, T, S), jnp.finfo(_F32).min)
    p_BKQS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BKSH.dtype).reshape(B, K, G * T, S)
    o_BKQH = jnp.einsum("bkqs,bksh->bkqh", p_BKQS, v_BKSH)
    return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _proj(spec: str, x: jax.Array, w: dict, name: str) -> jax.Array:
    """Projection `name` of a layer: an einsum on the stored weight, or, when the layer holds the output-major
    copy (`decode_layout`), the thin-product form on that."""
    if name + SUFFIX in w:
        return project(x, w[name + SUFFIX], INPUT_AXES[name])
    return jnp.einsum(spec, x, w[name])


def _qkv(cfg: ModelConfig, w: dict, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array],
         rules: ShardingRules | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm, projections, biases, QK-norm and RoPE: q [B, T, N, H], k/v [B, T, K, H]."""
    h = rms_norm(x_BTD, w["attn_norm"], cfg.rms_norm_eps)
    if "wqkv_t" in w:  # the decode layout's fused q/k/v heads
        N, K = cfg.num_heads, cfg.num_kv_heads
        qkv = project(h, w["wqkv_t"], 1)
        q, k, v = qkv[:, :, :N], qkv[:, :, N:N + K], qkv[:, :, N + K:]
    else:
        q = _proj("btd,dnh->btnh", h, w, "wq")
        k = _proj("btd,dkh->btkh", h, w, "wk")
        v = _proj("btd,dkh->btkh", h, w, "wv")
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = constrain(apply_rope(q, rope), ("batch", "length", "heads", "head_dim"), rules)
    k = constrain(apply_rope(k, rope), ("batch", "length", "kv_heads", "head_dim"), rules)
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"), rules)
    return q, k, v


def _out_and_mlp(cfg: ModelConfig, w: dict, x_BTD: jax.Array, o_BTNH: jax.Array,
                 rules: ShardingRules | None) -> jax.Array:
    """Output projection + residual, then the pre-norm SwiGLU MLP + residual."""
    # One flat contraction over (n, h): with two contracting axes XLA:CPU may reorder them to (h, n) and then
    # transpose the weight (a copy) on every call.
    B, T, N, H = o_BTNH.shape
    if "wo" + SUFFIX in w:
        o = project(o_BTNH, w["wo" + SUFFIX], INPUT_AXES["wo"])
    else:
        o = jnp.einsum("btf,fd->btd", o_BTNH.reshape(B, T, N * H), w["wo"].reshape(N * H, -1))
    if cfg.o_bias:
        o = o + w["bo"]
    x_BTD = constrain(x_BTD + o, ("batch", "length", "embed"), rules)

    h = rms_norm(x_BTD, w["mlp_norm"], cfg.rms_norm_eps)
    if not cfg.mlp_bias and "w_gate" in w:  # the training form: a hand-written backward (see models/swiglu.py)
        return constrain(x_BTD + swiglu(h, w["w_gate"], w["w_up"], w["w_down"], rules), ("batch", "length", "embed"),
                         rules)
    if "w_gate_up_t" in w:  # the decode layout's fused gate and up rows
        gate, up = jnp.split(project(h, w["w_gate_up_t"], 1), 2, axis=-1)
    else:
        gate = _proj("btd,df->btf", h, w, "w_gate")
        up = _proj("btd,df->btf", h, w, "w_up")
    if cfg.mlp_bias:
        gate, up = gate + w["b_gate"], up + w["b_up"]
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"), rules)
    down = _proj("btf,fd->btd", act, w, "w_down")
    if cfg.mlp_bias:
        down = down + w["b_down"]
    return constrain(x_BTD + down, ("batch", "length", "embed"), rules)


def _layer(cfg: ModelConfig, p: dict, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array], mask_BTS: jax.Array,
           rules: ShardingRules | None) -> jax.Array:
    """One pre-norm block over a whole sequence (no cache)."""
    w = {k: v.astype(x_BTD.dtype) for k, v in p.items()}
    q, k, v = _qkv(cfg, w, x_BTD, rope, rules)
    return _out_and_mlp(cfg, w, x_BTD, attention(cfg, q, k, v, mask_BTS), rules)


def embed_tokens(embed_VD: jax.Array, ids: jax.Array, rules: ShardingRules | None) -> jax.Array:
    """Rows of the embedding table for token ids. The table's model-width axis is gathered first (what FSDP
    does before using any weight): looked up from a table sharded along it, the rows could not follow the
    batch's sharding, and XLA replicated the whole lookup on every device and then repartitioned it."""
    table = constrain(embed_VD, ("vocab", None), rules)
    return jnp.take(table, ids, axis=0) if table.dtype == jnp.float32 else _take_rows_fp32_grad(table, ids)


@jax.custom_jvp
def _take_rows_fp32_grad(table_VD: jax.Array, ids: jax.Array) -> jax.Array:
    """jnp.take(table, ids, axis=0) for a table stored in bf16, whose gradient is summed in fp32: differentiated
    as it is, the lookup's gradient is a scatter-add in the table's dtype, and a bf16 row stops growing after 256
    equal contributions (a token that occurs 4096 times in a batch got 1/16 of its gradient). The tangent rule
    looks the rows up in fp32, so its transpose (reverse mode) scatter-adds into fp32; forward mode works too."""
    return jnp.take(table_VD, ids, axis=0)


@_take_rows_fp32_grad.defjvp
def _take_rows_jvp(primals, tangents):
    table_VD, ids = primals
    out = jnp.take(table_VD, ids, axis=0)
    return out, jnp.take(tangents[0].astype(jnp.float32), ids, axis=0).astype(out.dtype)


def checked_token_ids(cfg: ModelConfig, ids: jax.Array, name: str = "input_ids", ndim: int = 2) -> jax.Array:
    """`ids` as an integer array of `ndim` axes; a ValueError for another shape or dtype, and,
    when the values are known here (not traced under jit), for an id outside [0, vocab_size): the embedding
    lookup would read NaN there."""
    ids = ids if isinstance(ids, jax.Array) else jnp.asarray(ids)
    if ids.ndim != ndim or not jnp.issubdtype(ids.dtype, jnp.integer):
        axes = " ([batch, length])" if ndim == 2 else ""
        raise ValueError(f"{name}: expected integer token ids of {ndim} axes{axes}, got shape {tuple(ids.shape)} "
                         f"of {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        try:
            lo, hi = (int(v) for v in jax.device_get((ids.min(), ids.max())))
        except jax.errors.ConcretizationTypeError:  # concrete ids closed over inside a jitted function
            return ids
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"{name}: token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
    return ids


def hidden_states(
    cfg: ModelConfig,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    rules: ShardingRules | None = None,
) -> jax.Array:
    """Final-norm hidden states [B, T, D] in the compute dtype.

    positions default to `positions_from_mask(attention_mask)`; with packing, pass per-example positions
    and `segment_ids` (attention never crosses segments).
    """
    check_params(cfg, params)
    input_ids = checked_token_ids(cfg, input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    dt = cfg.dtype
    x = embed_tokens(params["embed"], input_ids, rules).astype(dt)
    x = constrain(x, ("batch", "length", "embed"), rules)
    mask = attention_mask_BTS(cfg, attention_mask, segment_ids)
    rope = rope_tables(cfg, positions)

    def body(x, p):
        return _layer(cfg, p, x, rope, mask, rules), None

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def unstack_layers(layers: dict) -> list[dict]:
    """Stacked layer parameters (leaves [L, ...]) -> a list of L per-layer dicts (copies: slices)."""
    n = len(jax.tree.leaves(layers)[0])
    return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]


def forward_with_cache(
    cfg: ModelConfig,
    params: dict,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BTS: jax.Array,
    cache: dict,
    cache_index: jax.Array,
    *,
    rules: ShardingRules | None = None,
    last_only: bool = False,
    empty_cache: bool = False,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """Run T new tokens against a KV cache: prefill (T = prompt length) and decode (T = 1) alike.

    cache: {"k": [L, B, K, S, H], "v": [L, B, K, S, H]} (axes CACHE_AXES); the new keys/values land at
    positions [cache_index, cache_index + T) of S. mask_BTS: which cache slots each new token may attend to
    (the caller combines causality, padding and any sliding window). Returns (logits [B, T, V] fp32, cache);
    with `last_only`, logits [B, 1, V] of position T - 1 only (left-padded rows all end there), skipping the
    vocabulary projection of the other positions. With `empty_cache` (a prefill into a fresh cache at
    cache_index 0) attention reads only the T new keys and values (mask_BTS[:, :, :T]) instead of all S slots.
    rope: `rope_tables(cfg, positions_BT)`, when the caller has computed them already (default: computed here).

    Only the T new slots of the cache are written (in place when the caller donates it or carries it in a
    loop); the S axis sits after the kv heads so attention reads it without a transpose.

    Stacked or per layer: with params["layers"] stacked (leaves [L, ...]) and a stacked cache the layers run
    in a `lax.scan`. params["layers"] may instead be a list of L per-layer dicts (`unstack_layers`), and
    cache["k"] lists of L arrays [B, K, H, S] (keys transposed, `attention_kt`) and cache["v"] of L arrays
    [B, K, S, H], as `sampling.cache.unstack_cache` gives; the layers then run in a Python loop and the
    cache comes back in the form it came in. On XLA:CPU every slice of a stacked array is a copy, so a decode
    loop that reads per-layer arrays avoids copying all weights and the whole cache every step.

    The cache arrays may instead hold the bits of the compute dtype as unsigned integers of its width
    (`sampling.cache.as_bits`: uint16 for bf16), read and written as that dtype: XLA:CPU updates a bf16 array
    through fp32, converting all of it (inside the layer scan, every layer's cache once per layer).
    """
    # A decode step looks up B rows: they are cheaper to replicate than the table to gather (see embed_tokens).
    x = jnp.take(params["embed"], input_ids_BT, axis=0).astype(cfg.dtype)
    x = constrain(x, ("batch", "length", "embed"), rules)
    rope = rope_tables(cfg, positions_BT) if rope is None else rope
    dt = cfg.dtype

    cache_dtype = jnp.dtype(jax.tree.leaves(cache)[0].dtype)
    bits = jnp.issubdtype(cache_dtype, jnp.unsignedinteger)  # the compute dtype's bits (`sampling.cache.as_bits`)
    if bits and cache_dtype.itemsize != jnp.dtype(dt).itemsize:
        raise ValueError(f"forward_with_cache: a {cache_dtype} cache holds the bits of a {cache_dtype.itemsize}-byte "
                         f"compute dtype, not of compute_dtype={cfg.compute_dtype}")

    def stored(new, c):
        return jax.lax.bitcast_convert_type(new.astype(dt), c.dtype) if bits else new.astype(c.dtype)

    def read(c):
        return jax.lax.bitcast_convert_type(c, dt) if bits else c

    def attend(p, x, k_cache, v_cache, write_k, write_v, keys_t):
        """One layer. `write_*(cache, new_BKTH)` stores the new keys/values: (cache, this layer's keys or
        values); with `keys_t` this layer's keys are [B, K, H, S], otherwise [B, K, S, H]."""
        w = {n: a.astype(dt) for n, a in p.items()}
        q, k, v = _qkv(cfg, w, x, rope, rules)
        k_BKTH, v_BKTH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        k_cache, k_layer = write_k(k_cache, k_BKTH)
        v_cache, v_BKSH = write_v(v_cache, v_BKTH)
        if empty_cache:  # nothing but the new tokens to attend to
            T = q.shape[1]
            if jnp.dtype(dt) != jnp.float32:
                # read back as stored: XLA may leave k/v unrounded (in fp32) inside a fusion (excess precision),
                # and the scores then differ from models.forward's by bf16 rounding (log-probs by up to 0.06 with
                # jax 0.12's CPU backend); the cache holds them rounded, as every decode step reads them
                k_BKTH = k_layer[..., :T].transpose(0, 1, 3, 2) if keys_t else k_layer[:, :, :T]
                v_BKTH = v_BKSH[:, :, :T]
            o = attention_kv_major(cfg, q, k_BKTH, v_BKTH, mask_BTS[:, :, :T])
        elif keys_t:
            o = attention_kt(cfg, q, k_layer.astype(dt), v_BKSH.astype(dt), mask_BTS)
        else:
            o = attention_kv_major(cfg, q, k_layer.astype(dt), v_BKSH.astype(dt), mask_BTS)
        return _out_and_mlp(cfg, w, x, o, rules), k_cache, v_cache

    layers, k_all, v_all = params["layers"], cache["k"], cache["v"]
    per_layer = [isinstance(t, list | tuple) for t in (layers, k_all, v_all)]
    if any(per_layer) and not all(per_layer):
        raise ValueError("forward_with_cache: params['layers'], cache['k'] and cache['v'] must be all stacked or "
                         "all per-layer lists")
    if all(per_layer):
        if not len(layers) == len(k_all) == len(v_all) == cfg.num_layers:
            raise ValueError(f"forward_with_cache: {len(layers)} layers of params, {len(k_all)}/{len(v_all)} of "
                             f"cache k/v; the config has {cfg.num_layers}")

        def write_v(c_BKSH, new_BKTH):
            c = jax.lax.dynamic_update_slice(c_BKSH, stored(new_BKTH, c_BKSH), (0, 0, cache_index, 0))
            c = constrain(c, CACHE_AXES[1:], rules)
            return c, read(c)

        def write_k(c_BKHS, new_BKTH):
            new_BKHT = stored(new_BKTH.transpose(0, 1, 3, 2), c_BKHS)
            c = jax.lax.dynamic_update_slice(c_BKHS, new_BKHT, (0, 0, 0, cache_index))
            c = constrain(c, KEYS_T_AXES, rules)
            return c, read(c)

        ks, vs = [], []
        for p, k_BKHS, v_BKSH in zip(layers, k_all, v_all, strict=True):
            x, k_BKHS, v_BKSH = attend(p, x, k_BKHS, v_BKSH, write_k, write_v, True)
            ks.append(k_BKHS)
            vs.append(v_BKSH)
        new_cache = {"k": ks, "v": vs}
    else:
        def body(carry, p):
            x, k_all, v_all, i = carry

            def write(c_LBKSH, new_BKTH):
                c = jax.lax.dynamic_update_slice(c_LBKSH, stored(new_BKTH[None], c_LBKSH), (i, 0, 0, cache_index, 0))
                c = constrain(c, CACHE_AXES, rules)
                return c, read(c[i])

            x, k_all, v_all = attend(p, x, k_all, v_all, write, write, False)
            return (x, k_all, v_all, i + 1), None

        (x, k_all, v_all, _), _ = jax.lax.scan(body, (x, k_all, v_all, jnp.int32(0)), layers)
        new_cache = {"k": k_all, "v": v_all}
    if last_only:
        x = x[:, -1:]
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return lm_logits(cfg, params, h, rules), new_cache


def lm_logits(cfg: ModelConfig, params: dict, h_BTD: jax.Array, rules: ShardingRules | None = None
              ) -> jax.Array:
    """Vocabulary logits [B, T, V] in fp32 (fp32 accumulation of the compute-dtype matmul)."""
    if cfg.num_labels:
        raise ValueError("this is a score-head model (num_labels > 0): use score_tokens / score_sequences")
    if is_decode_params(params):
        logits = project(h_BTD, params["lm_head_t"].astype(h_BTD.dtype), 1, preferred_element_type=_F32)
    elif cfg.tie_word_embeddings:
        logits = vocab_product("btd,vd->btv", h_BTD, params["embed"].astype(h_BTD.dtype))
    else:
        logits = vocab_product("btd,dv->btv", h_BTD, params["lm_head"].astype(h_BTD.dtype))
    return constrain(logits, ("batch", "length", "vocab"), rules)


def vocab_product(spec: str, h_BTD: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, h, w) accumulated and returned in fp32 (the logits), h and w in the compute dtype; in a
    low-precision compute dtype the backward products take the logits' cotangent in that dtype, as the forward
    product takes its operands. Differentiated as a plain einsum with an fp32 result, the fp32 cotangent promoted
    both backward products (the head's weight and input gradients, 2/3 of its FLOPs) to fp32 x fp32 matmuls, with
    the head upcast to fp32 for them: half the bf16 rate or less on a GPU. Rounding the cotangent to bf16 is what
    PyTorch autocast / HF do (bf16 logits, upcast for the loss); the weight gradient is still accumulated in fp32.
    bf16 only: float16 has 5 exponent bits, and a mean loss's logit cotangents (a token's probability over the
    batch's tokens, ~1e-8 and less) flush to zero in it (no loss scaling here): its products keep the fp32 one."""
    if h_BTD.dtype != jnp.bfloat16:
        return jnp.einsum(spec, h_BTD, w, preferred_element_type=_F32)
    return _low_precision_vocab_product(spec, h_BTD, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_vocab_product(spec: str, h_BTD: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, h_BTD, w, preferred_element_type=_F32)


def _vocab_product_fwd(spec, h_BTD, w):
    return _low_precision_vocab_product(spec, h_BTD, w), (h_BTD, w)


def _vocab_product_bwd(spec, res, ct_BTV):
    h_BTD, w = res
    # the transpose of the same einsum with a compute-dtype result: products in that dtype (fp32 accumulation)
    _, vjp = jax.vjp(lambda h, w: jnp.einsum(spec, h, w, preferred_element_type=h_BTD.dtype), h_BTD, w)
    return vjp(ct_BTV.astype(h_BTD.dtype))


_low_precision_vocab_product.defvjp(_vocab_product_fwd, _vocab_product_bwd)


def forward(
    cfg: ModelConfig,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    rules: ShardingRules | None = None,
) -> jax.Array:
    """Causal-LM logits [B, T, V], float32. Pure and jit-able (cfg and rules static)."""
    h = hidden_states(cfg, params, input_ids, attention_mask, positions=positions,
                      segment_ids=segment_ids, rules=rules)
    return lm_logits(cfg, params, h, rules)


def score_tokens(cfg: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 **kw) -> jax.Array:
    """Score-head outputs at every position [B, T, C], float32 (per-token values for a PPO critic)."""
    if "score" not in params:
        raise ValueError("these params have no score head (build the config with num_labels > 0)")
    h = hidden_states(cfg, params, input_ids, attention_mask, **kw)
    return jnp.einsum("btd,dc->btc", h, params["score"].astype(h.dtype), preferred_element_type=_F32)


def score_positions(cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[..., T] -> [...]: where a sequence's score is read, as HF *ForSequenceClassification reads it: the last
    position that is not the pad token (cfg.pad_token_id; when pad = eos, a row ending in eos is scored at the
    token before it) among those the attention mask keeps; 0 when there is none."""
    valid = attention_mask.astype(bool)
    if cfg.pad_token_id is not None:
        valid = valid & (input_ids != cfg.pad_token_id)
    return jnp.argmax(jnp.arange(input_ids.shape[-1]) * valid.astype(jnp.int32), axis=-1)


def score_sequences(cfg: ModelConfig, params: dict, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None, **kw) -> jax.Array:
    """Score-head outputs at each row's `score_positions` [B, C] (HF *ForSequenceClassification)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    scores_BTC = score_tokens(cfg, params, input_ids, attention_mask, **kw)
    last_B = score_positions(cfg, input_ids, attention_mask)
    return jnp.take_along_axis(scores_BTC, last_B[:, None, None], axis=1)[:, 0]
