"""HF export: save_pretrained -> transformers loads it with identical logits; sharded; atomic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from hf_models import build_hf_model, hf_logits, mixed_padding_batch, tiny_hf_config

from jaxrl_llm import models, parallel
from jaxrl_llm.models import hf_io
from jaxrl_llm.models.params import flatten


def _tiny_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = {f"w{i}": i for i in range(3, vocab)}
    words.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    hf = build_hf_model(tiny_hf_config("qwen3", heads=4, kv_heads=2, head_dim=16, vocab=96))
    d = tmp_path_factory.mktemp("src")
    hf.save_pretrained(d)
    return hf, str(d)


def test_round_trip_through_transformers(source, tmp_path):
    hf, folder = source
    cfg, params = models.load_pretrained(folder)
    out = tmp_path / "export"
    models.save_pretrained(cfg, params, str(out), tokenizer=_tiny_tokenizer(cfg.vocab_size))
    assert sorted(p for p in os.listdir(out) if not p.startswith("tokenizer")) == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"][-2:] == [5, 7]
    # And our own loader reads the export back to the same arrays.
    cfg2, params2 = models.load_pretrained(str(out))
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["layers"]["wq"]), np.asarray(params["layers"]["wq"]))


def test_sharded_export_from_a_mesh_reloads(source, tmp_path):
    hf, folder = source
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = models.load_pretrained(folder, mesh=mesh)
    out = tmp_path / "sharded"
    models.save_pretrained(cfg, params, str(out), max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.exists(out / s) for s in shards)
    assert not os.path.exists(out / "model.safetensors")
    assert index["metadata"]["total_size"] == 4 * models.num_params(cfg)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))
    _, again = models.load_pretrained(str(out))
    np.testing.assert_array_equal(np.asarray(again["embed"]), np.asarray(params["embed"]))


def test_bf16_export_loads_in_transformers(source, tmp_path):
    hf, folder = source
    cfg, params = models.load_pretrained(folder)
    models.save_pretrained(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16")
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"  # the keys of transformers 4 and 5
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    w = back.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    ref = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(w - ref).max() <= np.abs(ref).max() * 2**-8
    assert not np.array_equal(w, ref)  # really rounded to bf16


def test_score_head_exports_as_sequence_classification(tmp_path):
    hf = build_hf_model(tiny_hf_config("llama", num_labels=1), cls=transformers.AutoModelForSequenceClassification)
    hf.save_pretrained(tmp_path / "rm")
    cfg, params = models.load_pretrained(str(tmp_path / "rm"))
    models.save_pretrained(cfg, params, str(tmp_path / "rm_out"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm_out", dtype=torch.float32, attn_implementation="eager")
    assert type(back).__name__ == "LlamaForSequenceClassification"
    sd, ref = back.state_dict(), hf.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), hf(ids).logits.numpy())


def test_failed_export_leaves_nothing_half_written(source, tmp_path, monkeypatch):
    _, folder = source
    cfg, params = models.load_pretrained(folder)
    out = tmp_path / "exp"
    models.save_pretrained(cfg, params, str(out))
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}

    calls = {"n": 0}
    real = hf_io.write_safetensors

    def failing(path, entries, produce, metadata=None):
        def bad(name):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError("disk full (simulated)")
            return produce(name)
        return real(path, entries, bad, metadata)

    monkeypatch.setattr(hf_io, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        models.save_pretrained(cfg, params, str(out), max_shard_size="60KB")
    # The previous export is untouched and no temporary folder is left behind.
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["exp"]
    with pytest.raises(OSError):
        models.save_pretrained(cfg, params, str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_export_streams_one_tensor_at_a_time_and_other_processes_only_gather(source, tmp_path, monkeypatch):
    """Each tensor is fetched (a gather across processes) only after the previous one was written, so the host
    never holds more than the tensor being written; a non-zero process takes part in the same gathers in the
    same order and writes nothing."""
    import weakref

    import jax

    _, folder = source
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = models.load_pretrained(folder, mesh=mesh)
    real_fetch = hf_io._fetch
    fetched: list[tuple[str, int | None]] = []
    alive: list[weakref.ref] = []
    most_alive = [0]
    names = {id(v): k for k, v in flatten(params).items()}

    def fetch(arr, i):
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
        fetched.append((names[id(arr)], i))
        out = real_fetch(arr, i)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(hf_io, "_fetch", fetch)
    assert models.save_pretrained(cfg, params, str(tmp_path / "main")) == str(tmp_path / "main")
    writer_order = list(fetched)
    assert len(writer_order) == len(set(writer_order)) > 2 * cfg.num_layers  # each tensor (layer slice) once
    assert most_alive[0] <= 1  # at most the previously written tensor, not yet released, when the next comes

    fetched.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert models.save_pretrained(cfg, params, str(tmp_path / "other")) is None
    assert fetched == writer_order and not (tmp_path / "other").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".other")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_folder_follows_the_umask(source, tmp_path, umask):
    """The export was built in a mkdtemp folder (mode 0700) and renamed into place: on a shared cluster no one but
    its writer could read the exported model, whatever the umask."""
    _, folder = source
    cfg, params = models.load_pretrained(folder)
    old = os.umask(umask)
    try:
        out = models.save_pretrained(cfg, params, str(tmp_path / "hf"))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def test_reward_model_scores_where_hf_does_when_eos_is_pad(tmp_path):
    """HF *ForSequenceClassification reads the score at the last token that is not the pad token; with pad = eos
    (many reward models) a row ending in eos is scored at the token before it. score_sequences read the last
    token the attention mask keeps (the eos): an imported reward model scored other positions than in HF."""
    hcfg = tiny_hf_config("llama", pad_token_id=2, eos_token_id=2)
    hcfg.num_labels = 1
    hf = build_hf_model(hcfg, cls=transformers.AutoModelForSequenceClassification)
    hf.save_pretrained(tmp_path / "rm")
    cfg, params = models.load_pretrained(str(tmp_path / "rm"))
    ids = np.array([[5, 6, 7, 2, 2, 2], [5, 9, 11, 12, 13, 2], [5, 9, 11, 12, 13, 14]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(models.score_sequences(cfg, params, ids, mask))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert abs(ours[1, 0] - ours[2, 0]) > 1e-4  # the eos row is read at 13, the other at 14
