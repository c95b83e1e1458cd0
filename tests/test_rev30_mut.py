"""Review 30 (mutation testing of the day's changes): each test kills mutants of the new code that the day's own
tests let live (a condition dropped, a call removed, the wrong batch or row named)."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import recipe
from test_rev30_tok import _tokenizer

from jaxrl_llm import models, parallel, sampling
from jaxrl_llm.algorithms import sft
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data.bulk import one_dtype, tokenize_rows, tokenize_texts
from jaxrl_llm.data.chat import DataError, lm_text, to_conversation
from jaxrl_llm.data.tasks import load_tasks


class CharTok:
    """A character-level tokenizer: id = the character's code point ('😀' is 128512, past uint16), BOS 1 first when
    asked for special tokens; no EOS. \\x02 (id 2) is a special token."""

    eos_token_id = None
    bos_token_id = 1
    all_special_ids = [1, 2]
    chat_template = None

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        one = isinstance(texts, str)
        ids = [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}


def test_a_conversation_field_wins_over_text_and_a_row_of_neither_names_text():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert lm_text({"messages": conv, "text": "rendered"}, 0) is None  # (a data set that also keeps a rendering)
    assert lm_text({"prompt": "q", "completion": "a", "text": "rendered"}, 0) is None
    assert lm_text({"messages": None, "prompt": None, "text": "plain"}, 0) == "plain"  # a datasets table's None
    assert lm_text({"question": "?"}, 0) is None
    with pytest.raises(DataError, match=r"row 3: missing field 'messages' \(or 'prompt' and 'completion', or 'text'\)"):
        to_conversation({"question": "?"}, 3)


def test_one_dtype_widens_every_row_when_one_needs_it():
    small, big = np.array([1, 2], np.uint16), np.array([1, 70000], np.int32)
    mask = np.array([1, 1], np.uint8)
    assert [ids.dtype for (ids, _), in one_dtype([[(small, mask)], [(big, mask)]])] == [np.int32, np.int32]
    assert [ids.dtype for (ids, _), in one_dtype([[(small, mask)], [(small, mask)]])] == [np.uint16, np.uint16]
    # tokenize_rows (conversations, pairs) and tokenize_texts alike: a row past uint16 widens the others
    rows = tokenize_rows(CharTok(), 2, lambda i: [([("hi😀" if i else "hi", 1)], None)])
    assert [ids.dtype for (ids, _), in rows] == [np.int32, np.int32]


def test_texts_with_a_tokenizer_without_eos_and_texts_of_special_tokens_only():
    out = tokenize_texts(CharTok(), ["ab", "x😀", "\x02"])
    assert [ids.tolist() for (ids, _), in out] == [[1, 97, 98], [1, 120, 128512], [1, 2]]  # no EOS to add
    assert [ids.dtype for (ids, _), in out] == [np.int32] * 3
    assert [m.tolist() for (_, m), in out] == [[0, 1, 1], [0, 1, 1], [0, 0]]  # only special tokens: nothing learned


def _source(tmp_path, rows) -> str:
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(src)


def _sft_config(tmp_path, rows, **over):
    return recipe("sft_tiny", {"data.source": _source(tmp_path, rows), "data.num_examples": -1, "data.max_len": 64,
                               "data.cache": False, **over})


CONV = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]}


def test_mixed_rows_keep_their_order_and_one_dtype_and_the_first_conversation_is_named(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"row 1 is a conversation and the tokenizer has no chat template"):
        sft.prepare(_sft_config(tmp_path, [{"text": "ab"}, CONV, {"text": "cd"}, CONV]), CharTok())
    tok = _tokenizer("qwen2.5")
    real = sft.tokenize_texts
    # the texts' ids as a vocabulary past 65,536 gives them (int32), the conversations' uint16
    monkeypatch.setattr(sft, "tokenize_texts", lambda *a, **k: [[(ids.astype(np.int32), m)] for (ids, m), in
                                                                  real(*a, **k)])
    examples, stats = sft.prepare(_sft_config(tmp_path, [{"text": "Hello!"}, CONV, {"text": "See you."}],
                                                **{"data.max_len": 128}), tok)
    assert stats["rows"] == 3
    assert [tok.decode(ids) for ids, _ in examples][::2] == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert "<|im_start|>assistant" in tok.decode(examples[1][0])
    assert {ids.dtype for ids, _ in examples} == {np.dtype(np.int32)}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """Tokenizer folders: a base model's (no chat template) and one whose own template does not parse."""
    root = tmp_path_factory.mktemp("toks")
    base = _tokenizer("qwen2.5", chat_template="x")
    base.chat_template = None
    base.save_pretrained(root / "base")
    _tokenizer("qwen2.5", chat_template="{% if %}").save_pretrained(root / "broken")
    return root


def test_a_run_that_needs_no_template_still_checks_the_one_it_has(tok_dirs):
    from jaxrl_llm.run_tokenizer import load_run_tokenizer

    c = recipe("sft_tiny", {"tokenizer": str(tok_dirs / "base"), "data.chat_template": "{% for m in messages %}"})
    with pytest.raises(ConfigError, match=r"^data\.chat_template: .*line 1"):
        load_run_tokenizer(c, needs_template=False)
    with pytest.raises(ConfigError, match=r"^the tokenizer: .*line 1"):
        load_run_tokenizer(recipe("sft_tiny", {"tokenizer": str(tok_dirs / "broken")}), needs_template=False)
    assert load_run_tokenizer(recipe("sft_tiny", {"tokenizer": str(tok_dirs / "base")}),
                              needs_template=False).chat_template is None


def test_dpo_with_a_base_models_tokenizer_stops_at_start_up(tok_dirs, tmp_path):
    """Only SFT (its plain-text rows) may start without a chat template: DPO's rows are all rendered with one."""
    from jaxrl_llm import train

    with pytest.raises(ConfigError, match=r"the tokenizer: has no chat template"):
        train.run(recipe("dpo_tiny", {"tokenizer": str(tok_dirs / "base"), "export_hf": False,
                                      "metrics.tensorboard": False}), str(tmp_path / "run"))


def test_task_files_refuse_a_message_that_is_not_an_object(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"messages": ["What is 2+3?"], "answer": "5"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: field 'messages\[0\]' needs string 'role' and 'content'"):
        load_tasks(str(path))


def test_sft_rows_count_each_steps_own_batch_and_a_stop_on_a_row_adds_none(tmp_path, monkeypatch):
    """tokens_per_s counts the batch the step trained on (the next one is built during the step), and a stop
    right after a logged step writes no second row for it."""
    from jaxrl_llm import preemption, train
    from jaxrl_llm.preemption import Preempted

    tok = _tokenizer("qwen2.5")
    tok.save_pretrained(tmp_path / "tok")
    rows = [{"text": "Hello! " * (1 + 3 * i)} for i in range(8)]  # lengths 3..70 tokens: each batch its own count

    def make_step(cfg, optimizer, config, rules):  # its 'loss': the tokens of the batch it got
        return lambda state, batch, ref_params: (state, {"loss": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
                                                         "grad_norm": jnp.float32(1.0)})

    monkeypatch.setitem(train.REGISTRY, "sft", dataclasses.replace(train.REGISTRY["sft"], make_step=make_step))
    monkeypatch.setattr(preemption.StopOnSigterm, "requested", lambda self, step: step >= 4)
    c = _sft_config(tmp_path, rows, **{"tokenizer": str(tmp_path / "tok"), "max_steps": 9, "log_every": 2,
                                       "export_hf": False, "metrics.tensorboard": False, "train.batch_size": 2,
                                       "model.init.num_layers": 1, "checkpoint.every_steps": 0})
    with pytest.raises(Preempted):
        train.run(c, str(tmp_path / "run"))
    got = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [2, 4]
    assert len({r["loss"] for r in got}) == 2  # (the batches differ)
    for r in got:
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["loss"], rel=1e-4)


def test_a_grpo_steps_metrics_reduce_all_its_optimizer_updates(monkeypatch):
    """Two updates a step (4 rollouts, 2 per update): the row's loss is their mean, ratio_min their least."""
    import types

    from jax.sharding import NamedSharding, PartitionSpec
    from test_grpo import _config, _rollouts

    from jaxrl_llm import rl_train
    from jaxrl_llm.algorithms import grpo
    from jaxrl_llm.rl_train import GRPORunner

    monkeypatch.setattr(rl_train.sampling, "prepare_params",  # (the rollouts are faked: nothing to sample with)
                        lambda cfg, params, **kw: types.SimpleNamespace(params=params, reshard_seconds=0.0))

    r = object.__new__(GRPORunner)
    r.config = _config(**{"rollout.num_prompts": 2, "rollout.group_size": 2, "train.batch_size": 2,
                          "grpo.kl_coef": 0.0, "grpo.recompute_old_logprobs": False})
    r.G, r.P, r.R, r.mb_size, r.pad, r.group, r.chunked = 2, 2, 4, 2, 0, 1, None
    r.ref_logprobs = r.policy_logprobs = None  # (kl_coef 0, no recomputation: neither runs)
    r.cfg, r.rules, r.sampling_rules = None, None, None
    r.mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    r.full_sh = NamedSharding(r.mesh, PartitionSpec())
    r.batch_sh = {k: r.full_sh for k in grpo.BATCH_AXES}
    r.collect = lambda params, step: (_rollouts([1, 0, 1, 0], [2] * 4, ["stop"] * 4),
                                      {"time_generate_s": 1.0, "time_reshard_s": 0.0,
                                       "generated_tokens": 8.0})
    updates = iter([(1.0, 0.9, 1.1), (3.0, 0.5, 1.4)])

    def train_step(state, mb, first):
        loss, lo, hi = next(updates)
        return state, {"loss": jnp.float32(loss), "ratio_min": jnp.float32(lo), "ratio_max": jnp.float32(hi)}

    r.train_step = train_step
    _, m = r.step({"params": None}, None, 0)
    assert m["optimizer_updates"] == 2 and m["loss"] == 2.0
    assert (m["ratio_min"], m["ratio_max"]) == (pytest.approx(0.5), pytest.approx(1.4))
    assert (m["first_update_ratio_min"], m["first_update_ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.1))


CFG = models.ModelConfig(family="llama", vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)


# (generate_text building its table from its tokenizer: test_rev30_compile, from_tokenizer)


def test_the_unrolled_decodes_weight_layout_counts_as_a_compile():
    cfg = dataclasses.replace(CFG, vocab_size=59)  # (a model no other test compiles)
    params = models.init_params(cfg, jax.random.key(1))
    before = sampling.compile_counts().get("decode_params", 0)
    out = sampling.generate(cfg, params, [[1, 2, 3]], sampling.SamplingParams(max_new_tokens=2), 0,
                            unroll_layers=True)
    assert sampling.compile_counts().get("decode_params", 0) == before + 1 and out.stats["compiles"] >= 3


def test_weights_checksum_reads_every_leaf():
    from jaxrl_llm.checkpoint import weights_checksum

    a = {"w": jnp.zeros((3,)), "z": {"b": jnp.zeros((2,), jnp.bfloat16)}}
    b = {"w": jnp.zeros((3,)), "z": {"b": jnp.ones((2,), jnp.bfloat16)}}
    assert weights_checksum(a) == weights_checksum(jax.tree.map(jnp.copy, a)) != weights_checksum(b)


def test_batch_split_warning_weighs_the_devices_lost_not_the_axes():
    """data=4 x fsdp=2: 2 rows keep fsdp but lose data (4 devices), 4 rows keep data but lose fsdp (2)."""
    w = parallel.batch_split_warning(parallel.ShardingRules(), parallel.make_mesh(4, 2, 1),
                                     {"train.batch_size": 4, "a microbatch": 2})
    assert w.startswith("a microbatch=2 rows") and "replicated along data (" in w


def test_replication_warning_reads_every_mesh_axis_of_a_rule(caplog):
    """A rule naming two mesh axes (the width over fsdp and data, ZeRO-3 style): the one that does not divide is
    said."""
    rules = parallel.ShardingRules(tuple((n, ("fsdp", "data") if n == "embed" else a)
                                         for n, a in parallel.ShardingRules().rules))
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=36, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=2, head_dim=8)
    from jaxrl_llm.models.params import replication_warning

    w = replication_warning(cfg, {"data": 4, "fsdp": 2, "tensor": 1}, rules)
    assert w is not None and w.startswith("mesh.data=4 does not divide hidden_size=36"), w
    with caplog.at_level(logging.WARNING):
        assert replication_warning(cfg, {"data": 2, "fsdp": 2, "tensor": 1}, rules) is None


def test_init_params_places_by_the_rules_it_is_given():
    """init_params' kept initializer is per rules too: fsdp and tensor swapped place the weights swapped."""
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=4, num_kv_heads=4, head_dim=4)
    mesh = parallel.make_mesh(1, 2, 4)
    swap = {"fsdp": "tensor", "tensor": "fsdp"}
    rules = parallel.ShardingRules(tuple((n, swap.get(a, a) if isinstance(a, str) else a)
                                         for n, a in parallel.ShardingRules().rules))
    swapped = models.init_params(cfg, 0, mesh=mesh, rules=rules)
    default = models.init_params(cfg, 0, mesh=mesh)
    spec = jax.sharding.PartitionSpec
    assert swapped["layers"]["wq"].sharding.spec == spec(None, "tensor", "fsdp")
    assert default["layers"]["wq"].sharding.spec == spec(None, "fsdp", "tensor")
