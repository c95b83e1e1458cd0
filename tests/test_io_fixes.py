"""I/O fixes: export never replaces a folder that is not an earlier export; family flags match what the HF
family expresses; CSV cells are read as text; an index naming a tensor its shard lacks is a CheckpointError."""

from __future__ import annotations

import json
import os

import datasets
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_llm import models
from jaxrl_llm.data import DataError, load_rows
from jaxrl_llm.data import preference as pref
from jaxrl_llm.export import export_checkpoint

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, pad_token_id=0)


def _model(family: str = "llama", **kw):
    cfg = models.ModelConfig(family=family, **SIZES, **kw)
    params = models.init_params(cfg, jax.random.key(0), std=0.3)
    # non-zero biases and norms, so a dropped or invented parameter changes the logits
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), params)
    return cfg, params


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# ------------------------------------------------------------------------------- 1. export never deletes


def test_export_refuses_a_training_workdir_and_changes_nothing(tmp_path):
    cfg, params = _model()
    wd = tmp_path / "wd"
    (wd / "checkpoints" / "1").mkdir(parents=True)
    (wd / "checkpoints" / "1" / "state").write_text("ckpt")
    (wd / "metrics.jsonl").write_text('{"step": 1}\n')
    (wd / "my_notes.txt").write_text("notes")
    before = _snapshot(wd)
    with pytest.raises(FileExistsError, match=f"{wd}.*not an earlier HF export"):
        models.save_pretrained(cfg, params, str(wd))
    assert _snapshot(wd) == before
    assert sorted(os.listdir(tmp_path)) == ["wd"]  # no temporary folder left behind


@pytest.mark.parametrize("files", [{"a.txt": "user file"}, {"config.json": "{}", "README.md": "my model card"}])
def test_export_refuses_a_folder_with_files_an_export_does_not_write(tmp_path, files):
    cfg, params = _model()
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(FileExistsError, match="not an earlier HF export"):
        models.save_pretrained(cfg, params, str(out))
    assert _snapshot(out) == {k: v.encode() for k, v in files.items()}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_replaces_an_earlier_export_or_an_empty_folder(tmp_path):
    cfg, params = _model()
    out = tmp_path / "out"
    out.mkdir()
    models.save_pretrained(cfg, params, str(out))  # empty folder
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    models.save_pretrained(cfg, params, str(out), max_shard_size="20KB")  # earlier export -> sharded
    assert "model.safetensors" not in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)
    models.save_pretrained(cfg, params, str(out))  # and back
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    _, back = models.load_pretrained(str(out))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, back))


def test_export_cli_refuses_out_that_is_or_holds_the_workdir(tmp_path):
    wd = tmp_path / "run" / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "model_config.json").write_text("{}")
    before = _snapshot(tmp_path)
    for out in (wd, wd.parent, tmp_path):
        with pytest.raises(FileExistsError, match="workdir"):
            export_checkpoint(str(wd), str(out))
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- 2. family flags


def test_family_defaults_are_what_the_hf_family_implies():
    cfg = models.ModelConfig(family="qwen3", **SIZES)
    assert cfg.qk_norm and not cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias
    cfg = models.ModelConfig(family="qwen2", **SIZES)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm and not cfg.mlp_bias
    for fam in ("llama", "mistral"):
        cfg = models.ModelConfig(family=fam, **SIZES)
        assert not (cfg.qkv_bias or cfg.o_bias or cfg.qk_norm or cfg.mlp_bias)
    # llama / qwen3 attention_bias: the q/k/v and o biases together
    for fam in ("llama", "qwen3"):
        assert models.ModelConfig(family=fam, qkv_bias=True, **SIZES).o_bias
        assert models.ModelConfig(family=fam, o_bias=True, **SIZES).qkv_bias
    for fam in ("llama", "mistral", "qwen2", "qwen3"):
        cfg = models.ModelConfig(family=fam, **SIZES)
        assert models.config_from_hf(models.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family,flags,named", [
    ("llama", dict(qk_norm=True), "qk_norm=True"),
    ("llama", dict(qkv_bias=True, o_bias=False), "qkv_bias=True with o_bias=False"),
    ("llama", dict(sliding_window=8), "sliding_window=8"),
    ("mistral", dict(qkv_bias=True), "qkv_bias=True"),
    ("mistral", dict(mlp_bias=True), "mlp_bias=True"),
    ("qwen2", dict(qkv_bias=False), "qkv_bias=False"),
    ("qwen2", dict(o_bias=True), "o_bias=True"),
    ("qwen3", dict(qk_norm=False), "qk_norm=False"),
    ("qwen3", dict(mlp_bias=True), "mlp_bias=True"),
])
def test_flags_no_hf_config_of_the_family_expresses_are_refused_on_export(tmp_path, family, flags, named):
    cfg, params = _model(family, **flags)  # fine in memory (tests use every optional leaf) ...
    with pytest.raises(ValueError, match=f"family='{family}'.*{named}"):
        models.config_to_hf(cfg)
    with pytest.raises(ValueError, match=named):  # ... but never exported as a different model
        models.save_pretrained(cfg, params, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_default_qwen_configs_export_the_model_they_run(tmp_path, family):
    cfg, params = _model(family)
    models.save_pretrained(cfg, params, str(tmp_path))
    cfg2, params2 = models.load_pretrained(str(tmp_path))
    assert cfg2 == cfg
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6) % SIZES["vocab_size"]
    ours = np.asarray(models.forward(cfg, params, ids))
    np.testing.assert_allclose(np.asarray(models.forward(cfg2, params2, ids)), ours, atol=1e-5)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


# ------------------------------------------------------------------------------- 3. CSV as text, Dataset


def test_csv_cells_are_text_and_only_empty_cells_are_missing(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("prompt,chosen,rejected,note\n"
                 "What is 2+2?,4,5,\n"
                 "Agent code?,007,7,NA\n"
                 "Is 9 prime? Answer yes or None.,None,yes,nan\n")
    rows = load_rows(str(p))
    assert rows == [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "note": None},
        {"prompt": "Agent code?", "chosen": "007", "rejected": "7", "note": "NA"},
        {"prompt": "Is 9 prime? Answer yes or None.", "chosen": "None", "rejected": "yes", "note": "nan"},
    ]
    for i, r in enumerate(pref.load_preference_rows(str(p))):
        pref.to_preference(r, i)


def test_load_rows_takes_a_datasets_dataset_and_names_other_types():
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]})
    assert load_rows(ds) == [{"prompt": "a", "chosen": "c", "rejected": "e"},
                             {"prompt": "b", "chosen": "d", "rejected": "f"}]
    assert len(load_rows(ds, num_examples=1)) == 1
    with pytest.raises(DataError, match="split"):
        load_rows(datasets.DatasetDict({"train": ds}))
    with pytest.raises(DataError, match="got int"):
        load_rows(3)
    rows = pref.load_preference_rows(ds, num_examples=1)  # the preference path takes it too
    assert rows == [{"prompt": "a", "chosen": "c", "rejected": "e"}]
    assert pref.to_preference(rows[0], 0)[1] == [{"role": "assistant", "content": "c"}]


# ------------------------------------------------------------------------------- 4. index vs shard


def test_index_naming_a_tensor_its_opened_shard_lacks_is_a_checkpoint_error(tmp_path):
    cfg, params = _model()
    models.save_pretrained(cfg, params, str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in tensors}  # the index lists every tensor ...
    del tensors["lm_head.weight"]  # ... the shard (opened for the earlier tensors) lacks lm_head.weight
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(models.CheckpointError, match="model.safetensors: index lists tensor 'lm_head.weight'"):
        models.load_pretrained(str(tmp_path))


_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("family,extra", [
    ("llama", {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0}}),
    ("llama", {"num_key_value_heads": 2, "max_position_embeddings": 512, "original_max_position_embeddings": 128,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    ("llama", {"rope_parameters": {"type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    ("llama", {"rope_parameters": {"type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}}),
    ("mistral", {"num_key_value_heads": 2}),  # no sliding_window, no max_position_embeddings
    ("mistral", {"num_key_value_heads": 2, "sliding_window": None}),
    ("qwen2", {"num_key_value_heads": 2}),
    ("qwen3", {"num_key_value_heads": 2}),  # no head_dim: transformers' 128, not hidden / heads
    ("qwen3", {"num_attention_heads": 64}),  # no num_key_value_heads: transformers' 32
])
def test_keys_a_config_leaves_out_are_read_as_transformers_reads_them(family, extra):
    """A hand-written or converted config.json that omits keys must give the model transformers builds from it."""
    import transformers

    d = {**_BASE, "model_type": family, **extra}
    ref = transformers.AutoConfig.for_model(**d)
    ref.standardize_rope_params()
    got = models.config_from_hf(d)
    assert got.max_position_embeddings == ref.max_position_embeddings
    assert got.num_kv_heads == ref.num_key_value_heads
    assert got.head_dim == getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert got.sliding_window == getattr(ref, "sliding_window", None)
    rp = ref.rope_parameters
    assert got.rope_theta == rp["rope_theta"]
    if rp["rope_type"] == "default":
        assert got.rope_scaling is None
    else:
        assert got.rope_scaling.rope_type == rp["rope_type"] and got.rope_scaling.factor == rp["factor"]
        if rp["rope_type"] == "llama3":
            assert got.rope_scaling.original_max_position_embeddings == rp["original_max_position_embeddings"]
