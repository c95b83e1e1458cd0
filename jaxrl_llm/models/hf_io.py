"""HF checkpoint names <-> our parameter layout, sharded loading and streaming export.

Loading reads one HF tensor at a time on the host, converts it to our layout and places it straight into
its sharded position on the mesh (stacked layers are filled slice by slice on device), so a 70B
checkpoint is never materialised whole in host memory. Exporting does the reverse, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxrl_llm.models.config import ModelConfig, config_from_hf, config_to_hf, resolve_dtype
from jaxrl_llm.models.params import param_specs, unflatten, warn_replicated
from jaxrl_llm.models.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    _unique_keys,
    write_safetensors,
)
from jaxrl_llm.models.staging import remove_leftovers, staging_folder
from jaxrl_llm.parallel.mesh import single_device_mesh
from jaxrl_llm.parallel.rules import ShardingRules, as_rules

log = logging.getLogger(__name__)


class TensorSource(Protocol):
    """HF-named tensors in HF layout, read one at a time."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class HFName:
    """Where one of our parameters lives in an HF checkpoint and how its layout differs.

    HF linear weights are [out, in]; ours are [in..., out...] with heads split out. `n_in` is how many of
    our leading (per-layer) dims form HF's `in` dim; n_in=0 means the same elements in the same order
    (embeddings, norms; per-head biases are flattened on the HF side).
    """

    template: str  # with {i} for the layer index
    n_in: int
    flat: bool = False  # HF stores it flattened ([N*H] for our [N, H] biases)


_HF_LAYER = "model.layers.{i}."
HF_NAMES: dict[str, HFName] = {
    "embed": HFName("model.embed_tokens.weight", 0),
    "final_norm": HFName("model.norm.weight", 0),
    "lm_head": HFName("lm_head.weight", 1),
    "score": HFName("score.weight", 1),
    "layers/attn_norm": HFName(_HF_LAYER + "input_layernorm.weight", 0),
    "layers/mlp_norm": HFName(_HF_LAYER + "post_attention_layernorm.weight", 0),
    "layers/wq": HFName(_HF_LAYER + "self_attn.q_proj.weight", 1),
    "layers/wk": HFName(_HF_LAYER + "self_attn.k_proj.weight", 1),
    "layers/wv": HFName(_HF_LAYER + "self_attn.v_proj.weight", 1),
    "layers/wo": HFName(_HF_LAYER + "self_attn.o_proj.weight", 2),
    "layers/bq": HFName(_HF_LAYER + "self_attn.q_proj.bias", 0, flat=True),
    "layers/bk": HFName(_HF_LAYER + "self_attn.k_proj.bias", 0, flat=True),
    "layers/bv": HFName(_HF_LAYER + "self_attn.v_proj.bias", 0, flat=True),
    "layers/bo": HFName(_HF_LAYER + "self_attn.o_proj.bias", 0),
    "layers/q_norm": HFName(_HF_LAYER + "self_attn.q_norm.weight", 0),
    "layers/k_norm": HFName(_HF_LAYER + "self_attn.k_norm.weight", 0),
    "layers/w_gate": HFName(_HF_LAYER + "mlp.gate_proj.weight", 1),
    "layers/w_up": HFName(_HF_LAYER + "mlp.up_proj.weight", 1),
    "layers/w_down": HFName(_HF_LAYER + "mlp.down_proj.weight", 1),
    "layers/b_gate": HFName(_HF_LAYER + "mlp.gate_proj.bias", 0),
    "layers/b_up": HFName(_HF_LAYER + "mlp.up_proj.bias", 0),
    "layers/b_down": HFName(_HF_LAYER + "mlp.down_proj.bias", 0),
}


def hf_shape(ours_shape: tuple[int, ...], n_in: int, flat: bool = False) -> tuple[int, ...]:
    if n_in == 0:
        return (math.prod(ours_shape),) if flat else tuple(ours_shape)
    return (math.prod(ours_shape[n_in:]), math.prod(ours_shape[:n_in]))


def hf_to_ours(x: np.ndarray, ours_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    return (x if n_in == 0 else x.T).reshape(ours_shape)


def ours_to_hf(x: np.ndarray, n_in: int, flat: bool = False) -> np.ndarray:
    if n_in == 0:
        return x.reshape(-1) if flat else x
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


# ----------------------------------------------------------------------------------------------- loading


def _read_index(index: str) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file name); a tensor listed twice (json.load
    would keep the last silently) or a malformed file is a CheckpointError naming the file."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f, object_pairs_hook=_unique_keys)["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:  # (ValueError: JSON, UTF-8, a key twice)
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                              f"file names; got {type(weight_map).__name__})")
    return weight_map


class HFFolderSource:
    """Tensors of an HF folder: model.safetensors or a sharded index (model.safetensors.index.json); names without
    the `model.` prefix (a base model's) get it, as transformers reads them. A folder with both reads
    model.safetensors, as transformers does (transformers' save_pretrained of an unsharded model into a folder
    that held a sharded one removes the old shards and leaves the index), with a warning."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._stored: dict[str, str] = {}  # our name -> the name in the file, where they differ
        weight_map = _read_index(index) if os.path.exists(index) else None
        if weight_map is not None and os.path.exists(single) and "model.safetensors" not in weight_map.values():
            shards = sorted(set(weight_map.values()))
            present = sum(os.path.isfile(os.path.join(folder, f)) for f in shards)
            log.warning("%s holds both model.safetensors and model.safetensors.index.json (%d shard file(s), %d of "
                        "them present): model.safetensors is loaded, as transformers loads it, and the index is "
                        "ignored; remove whichever of the two is stale", folder, len(shards), present)
            weight_map = None
        if weight_map is not None:
            lost = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
            if lost:
                name = next(k for k, f in weight_map.items() if f == lost[0])
                raise CheckpointError(f"{index}: lists tensor {name!r} in {lost[0]}, which the folder lacks "
                                      f"({len(lost)} of {len(set(weight_map.values()))} shard files missing: "
                                      f"{lost[:3]}{' ...' if len(lost) > 3 else ''}); an incomplete download?")
            self._where = dict(weight_map)
        elif os.path.exists(single):
            self._files["model.safetensors"] = SafetensorsFile(single)
            for name in self._files["model.safetensors"].keys():
                self._where[name] = "model.safetensors"
        else:
            found = sorted(os.listdir(folder))
            if any(f.endswith(".bin") or f.endswith(".pt") for f in found):
                raise CheckpointError(
                    f"{folder}: only pickle checkpoints (*.bin/*.pt) found; they are never loaded (unsafe). "
                    "Convert them to safetensors first")
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json (found {found})")
        if self._where and not any(k.startswith("model.") for k in self._where):
            # a base model's names (saved from LlamaModel, or by a tool that drops the prefix): transformers adds
            # the `model.` prefix to every name but the heads', and so do we
            self._stored = {k if k.startswith(("lm_head.", "score.")) else "model." + k: k for k in self._where}
            self._where = {k: self._where[v] for k, v in self._stored.items()}

    def _file(self, name: str) -> SafetensorsFile:
        fname = self._where[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.folder, fname))
        stored = self._stored.get(name, name)
        if stored not in self._files[fname].keys():  # every tensor: a shard is opened for its first tensor only
            raise CheckpointError(f"{self.folder}/{fname}: index lists tensor {stored!r}, the file lacks it")
        return self._files[fname]

    def alias(self, name: str, stored: str) -> None:
        """Read tensor `name` from the checkpoint's tensor `stored` (one of `keys()`)."""
        self._where[name] = self._where[stored]
        self._stored[name] = self._stored.get(stored, stored)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(self._stored.get(name, name))

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(self._stored.get(name, name))


def _check_tensor(src: TensorSource, keys: set[str], name: str, want: tuple[int, ...]) -> None:
    if name not in keys:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    got = tuple(src.shape(name))
    if got != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {list(got)} in the checkpoint, the config needs {list(want)}")


def _check_source(cfg: ModelConfig, src: TensorSource, keys: set[str], missing_ok: tuple[str, ...]) -> None:
    """Every tensor `cfg` needs is in `src` with its shape, checked before anything is allocated: a config whose
    num_hidden_layers or intermediate_size is far beyond the checkpoint's (a corrupted header, a typo) is named, not
    a [num_layers, ...] buffer of many GB allocated for it first. (Stops at the first missing tensor.)"""
    for path, spec in param_specs(cfg).items():
        hn = HF_NAMES[path]
        if path in missing_ok and hn.template not in keys:
            continue
        layered = path.startswith("layers/")
        want = hf_shape(spec.shape[1:] if layered else spec.shape, hn.n_in, hn.flat)
        for i in range(cfg.num_layers if layered else 1):
            _check_tensor(src, keys, hn.template.format(i=i), want)


def _hf_tensor(src: TensorSource, keys: set[str], name: str, want: tuple[int, ...]) -> np.ndarray:
    _check_tensor(src, keys, name, want)
    x = src.get(name)
    if x.dtype.kind in "biu":  # (a quantized checkpoint's packed weights: as floats they would be garbage)
        raise CheckpointError(f"tensor {name!r} is {x.dtype} in the checkpoint, not floating point (a quantized "
                              "checkpoint?); use the unquantized model")
    return x


@partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer(stacked, layer, i, sharding):
    return jax.lax.with_sharding_constraint(stacked.at[i].set(layer), sharding)


def _host_to_device(host: np.ndarray, sharding: NamedSharding, dtype: np.dtype) -> jax.Array:
    """Each device takes only its slice of `host` (a view of the memory-mapped file), converted to `dtype` slice
    by slice: a process reads and converts only what its own devices hold, never the whole tensor."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.array(host[idx], dtype=dtype, order="C"))


def load_params_from_source(
    cfg: ModelConfig,
    src: TensorSource,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    missing_ok: tuple[str, ...] = (),
) -> dict:
    """Read every parameter of `cfg` from `src` into sharded device arrays of `dtype`."""
    dt = resolve_dtype(dtype)
    np_dt = np.dtype(ml_dtypes.bfloat16) if dt == jnp.bfloat16 else np.dtype(dt)
    rules = as_rules(rules)
    if mesh is not None:
        warn_replicated(cfg, mesh, rules)
    mesh = mesh or single_device_mesh()
    keys = set(src.keys())
    _check_source(cfg, src, keys, missing_ok)
    out: dict[str, jax.Array] = {}
    for path, spec in param_specs(cfg).items():
        hn = HF_NAMES[path]
        sharding = rules.sharding(mesh, spec.axes, spec.shape)
        if path in missing_ok and hn.template not in keys:
            continue
        if not path.startswith("layers/"):
            host = hf_to_ours(_hf_tensor(src, keys, hn.template, hf_shape(spec.shape, hn.n_in, hn.flat)),
                              spec.shape, hn.n_in)
            out[path] = _host_to_device(host, sharding, np_dt)
            continue
        layer_shape = spec.shape[1:]
        layer_spec = rules.spec(spec.axes[1:], layer_shape, dict(mesh.shape))
        layer_sharding = NamedSharding(mesh, layer_spec)
        stacked = jax.jit(partial(jnp.zeros, spec.shape, dt), out_shardings=sharding)()
        for i in range(cfg.num_layers):
            name = hn.template.format(i=i)
            host = hf_to_ours(_hf_tensor(src, keys, name, hf_shape(layer_shape, hn.n_in, hn.flat)),
                              layer_shape, hn.n_in)
            stacked = _set_layer(stacked, _host_to_device(host, layer_sharding, np_dt), i, sharding)
        out[path] = stacked
    used = {HF_NAMES[p].template.format(i=i) for p in param_specs(cfg) for i in range(cfg.num_layers)}
    unused = sorted(k for k in keys - used if not k.endswith("rotary_emb.inv_freq")  # a buffer, not a weight
                    and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if unused:  # as transformers warns: a config that leaves weights out (attention_bias=false beside q_proj.bias)
        log.warning("%d tensor(s) of the checkpoint are not used by this model's config and were left out: %s%s",
                    len(unused), unused[:5], " ..." if len(unused) > 5 else "")
    return unflatten(out)


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such model folder")
    if not os.path.exists(path):
        if any(os.path.exists(os.path.join(folder, f)) for f in _RUN_FILES):
            hf = os.path.join(folder, "hf")
            raise CheckpointError(f"{folder}: missing config.json; it is a training workdir, not a model folder: "
                                  + (f"its final model is {hf}" if os.path.isfile(os.path.join(hf, "config.json"))
                                     else "no hf/ export yet") + "; `python -m jaxrl_llm.export --workdir "
                                  f"{folder} --out DIR` writes a checkpoint's")
        raise CheckpointError(f"{folder}: missing config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, RecursionError) as e:  # (JSON, UTF-8, a 5000-digit number, [[[[... nested too deep)
        raise CheckpointError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: a JSON {type(d).__name__}, not an object of model settings")
    return _with_generation_eos(folder, d)


def _eos_list(v: Any) -> list[int] | None:
    items = v if isinstance(v, list) else [] if v is None else [v]
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in items):
        return None
    return items


def read_generation_config(folder: str) -> dict | None:
    """An HF folder's generation_config.json (sampling defaults and end ids), or None: absent, not a folder, or
    unreadable (left out with a warning, as transformers does)."""
    path = os.path.join(folder, "generation_config.json")
    if not folder or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            g = json.load(f)
        if not isinstance(g, dict):
            raise ValueError(f"a JSON {type(g).__name__}, not an object of generation settings")
        if _eos_list(g.get("eos_token_id")) is None:
            raise ValueError(f"eos_token_id={g.get('eos_token_id')!r} is not a token id or a list of them")
    except (OSError, ValueError) as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        log.warning("%s: left out, its end ids not used as stop ids (%s)", path, e)
        return None
    return g


def _with_generation_eos(folder: str, d: dict) -> dict:
    """config.json's settings, with the end ids of generation_config.json added to its eos_token_id: instruct
    checkpoints list their turn-end tokens there (Qwen2.5's <|endoftext|> beside <|im_end|>, Gemma's
    <end_of_turn>), and transformers' generate stops at them."""
    g = read_generation_config(folder)
    extra = [] if g is None else _eos_list(g.get("eos_token_id"))
    own = _eos_list(d.get("eos_token_id"))
    if own is None or not extra or set(extra) <= set(own):  # (config.json's own value: config_from_hf's to read)
        return d
    if "eos_token_id" not in d and d.get("model_type") in ("llama", "mistral"):
        own = [2]  # transformers' default for these families
    return {**d, "eos_token_id": list(dict.fromkeys([*own, *extra]))}


def _same_rows(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    return a.shape == b.shape and all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, len(a), rows))


def _untie_distinct_head(cfg: ModelConfig, src: TensorSource, where: str) -> ModelConfig:
    """cfg untied when it says tie_word_embeddings=true but `src` holds an lm_head.weight that differs from the
    embedding (a config that does not describe its checkpoint), as transformers (>= 5) loads it: the output
    projection is the checkpoint's own, and exports write it untied."""
    keys = set(src.keys())
    head, embed = HF_NAMES["lm_head"].template, HF_NAMES["embed"].template
    if not cfg.tie_word_embeddings or cfg.num_labels or head not in keys or embed not in keys:
        return cfg
    if tuple(src.shape(head)) != tuple(src.shape(embed)) or _same_rows(src.get(head), src.get(embed)):
        return cfg  # (a copy of the embedding: tied is the same model)
    log.warning("%s: tie_word_embeddings=true, but the checkpoint's lm_head.weight differs from its "
                "model.embed_tokens.weight: loaded untied, with that lm_head, as transformers >= 5 loads it "
                "(transformers 4.x and vLLM tie and leave it out); exports write tie_word_embeddings=false", where)
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def load_hf_folder(folder: str, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                   rules: ShardingRules | None = None) -> tuple[ModelConfig, dict]:
    where = os.path.join(folder, "config.json")
    cfg = config_from_hf(read_hf_config(folder), where=where)
    src = HFFolderSource(folder)
    # A tied checkpoint may carry lm_head.weight: a copy of the embedding is not needed (param_specs omits it), a
    # different tensor means the config is wrong (_untie_distinct_head); or only lm_head.weight, the embedding kept
    # under the head's name (safetensors.torch.save_model keeps that one of the two)
    cfg = _untie_distinct_head(cfg, src, where)
    head, embed = HF_NAMES["lm_head"].template, HF_NAMES["embed"].template
    if cfg.tie_word_embeddings and embed not in src.keys() and head in src.keys():
        src.alias(embed, head)
    return cfg, load_params_from_source(cfg, src, dtype, mesh, rules)


# ----------------------------------------------------------------------------------------------- export


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB'")
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _hf_entries(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """(hf_name, our_path, layer index or None, hf shape) in a stable order."""
    for path, spec in param_specs(cfg).items():
        hn = HF_NAMES[path]
        if path.startswith("layers/"):
            for i in range(cfg.num_layers):
                yield hn.template.format(i=i), path, i, hf_shape(spec.shape[1:], hn.n_in, hn.flat)
        else:
            yield hn.template, path, None, hf_shape(spec.shape, hn.n_in, hn.flat)


def _fetch(arr: jax.Array, i: int | None) -> np.ndarray:
    """One tensor (or one layer slice) to the host, gathered from every process in a multi-process job (a
    collective); nothing else is fetched."""
    from jaxrl_llm.distributed import to_host

    x = arr if i is None else arr[i]
    return to_host(x) if isinstance(x, jax.Array) else np.asarray(x)


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What an HF export folder holds besides its tokenizer's own files: an existing `out_dir` is replaced only when
# everything in it is one of these (or a name the new export writes too); anything else is refused, never deleted.
_EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt"}
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_RUN_FILES = ("checkpoints", "metrics.jsonl", "model_config.json", "tensorboard")  # a training workdir's


def check_replaceable(out_dir: str, new_names: set[str] = frozenset()) -> None:
    """Refuse (FileExistsError) to replace an existing `out_dir` that is not an earlier HF export: a file, a
    training workdir, a folder without config.json, or one holding anything an export does not write (its
    tokenizer's files are `new_names`, what the new export holds)."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a folder; not replaced by the HF export")
    found = sorted(os.listdir(out_dir))
    if not found:
        return
    why = ""
    run = [f for f in _RUN_FILES if f in found]
    if run:
        why = f"it holds {run}: a training workdir (or another run's files)"
    elif "config.json" not in found:
        why = f"it has no config.json (found {found[:8]}{' ...' if len(found) > 8 else ''})"
    elif new_names:
        def exported(f: str) -> bool:
            if f in new_names:
                return True
            return bool(f in _EXPORT_FILES or _SHARD_FILE.fullmatch(f)) and os.path.isfile(os.path.join(out_dir, f))

        other = [f for f in found if not exported(f)]
        if other:
            why = f"it holds {other[:8]}{' ...' if len(other) > 8 else ''}, which an HF export does not write"
    if why:
        raise FileExistsError(f"{out_dir}: exists and is not an earlier HF export ({why}); nothing was changed. "
                              "Export to a new or empty folder, or remove that one yourself")


def portable_tokenizer_class(folder: str) -> None:
    """transformers 5 saves a generic fast tokenizer (a GGUF file's, or one built on a `tokenizers.Tokenizer`) with
    tokenizer_class "TokenizersBackend", which transformers 4.x (vLLM's, mlx-lm's, llama.cpp's converter's) refuses
    ("Tokenizer class TokenizersBackend does not exist"); "PreTrainedTokenizerFast" names the same class in both."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if isinstance(doc, dict) and doc.get("tokenizer_class") == "TokenizersBackend":
        doc["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")


def save_pretrained(cfg: ModelConfig, params: dict, out_dir: str, tokenizer: Any = None,
                    max_shard_size: int | str = "5GB", dtype: Any = None,
                    generation_config: dict | None = None) -> str | None:
    """Write an HF folder (config.json, safetensors or sharded safetensors + index, tokenizer files, and
    generation_config.json when `generation_config` is given: the source model's, e.g. `read_generation_config`,
    its sampling defaults kept and its end ids those of `cfg`).

    Written to a temporary folder beside `out_dir` and moved into place only when complete, so a failure
    leaves no half-written export (and an existing `out_dir` untouched). An existing `out_dir` is replaced
    only when it is an earlier export (config.json, safetensors, tokenizer files); any other non-empty folder
    (a training workdir, one holding other files) raises FileExistsError and is left as it was. Tensors
    stream one at a time from the devices into the file. In a multi-process job every process must call
    this: each tensor is gathered in turn (all processes take part), process 0 writes it before the next is
    fetched, so no host holds more than one tensor; returns `out_dir` on process 0 and None elsewhere.
    """
    from jaxrl_llm.models.params import check_params, flatten

    check_params(cfg, params)
    flat = flatten(params)
    leaf_dt = np.dtype(ml_dtypes.bfloat16) if flat["embed"].dtype == jnp.bfloat16 else np.dtype(flat["embed"].dtype)
    out_dt = leaf_dt if dtype is None else (
        np.dtype(ml_dtypes.bfloat16) if resolve_dtype(dtype) == jnp.bfloat16 else np.dtype(resolve_dtype(dtype)))
    torch_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(out_dt.name, "float32")
    hf_config = config_to_hf(cfg, torch_dtype)  # raises for a config no HF config of its family describes
    limit = _parse_size(max_shard_size)

    entries = list(_hf_entries(cfg, params))
    shards: list[list[tuple[str, str, int | None, tuple[int, ...]]]] = [[]]
    used = 0
    for e in entries:
        nbytes = math.prod(e[3]) * out_dt.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += nbytes

    out_dir = os.path.abspath(out_dir)
    check_replaceable(out_dir)  # on every process, before the first gather: a refusal must not leave others in one
    if jax.process_index() != 0:
        for _, path, i, _ in entries:  # the writer's gathers, in its order
            _fetch(flat[path], i)
        return None
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(parent, base)  # of an export to the same place that was killed
    with staging_folder(parent, base) as tmp:
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the export from everyone else
            total = 0
            weight_map: dict[str, str] = {}
            for k, shard in enumerate(shards):
                fname = ("model.safetensors" if len(shards) == 1
                         else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
                lookup = {e[0]: e for e in shard}

                def produce(name, lookup=lookup):
                    _, path, i, _ = lookup[name]
                    return ours_to_hf(_fetch(flat[path], i), HF_NAMES[path].n_in, HF_NAMES[path].flat).astype(out_dt)

                total += write_safetensors(os.path.join(tmp, fname), [(e[0], e[3], out_dt) for e in shard],
                                           produce, metadata={"format": "pt"})
                weight_map.update({e[0]: fname for e in shard})
            if len(shards) > 1:
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
            if generation_config is not None:
                ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                       if hf_config[k] is not None}
                with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                    json.dump({**generation_config, **ids}, f, indent=2)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
                portable_tokenizer_class(tmp)
            check_replaceable(out_dir, set(os.listdir(tmp)))
            if os.path.lexists(out_dir):
                with staging_folder(parent, base, "old") as old:
                    os.rename(out_dir, os.path.join(old, "x"))
                    os.rename(tmp, out_dir)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("exported %s (%d tensors, %d shard(s), %.1f MB)", out_dir, len(entries), len(shards), total / 1e6)
    return out_dir


__all__ = ["HF_NAMES", "HFFolderSource", "load_hf_folder", "load_params_from_source",
           "read_generation_config", "save_pretrained"]
