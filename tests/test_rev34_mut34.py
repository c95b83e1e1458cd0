"""Mutation review of the day's changes: tests that kill mutants the suite let through (each names the mutant).

Sampling filter: a row with top_p=1 beside a row with top-p (the two threshold paths), the candidates' exact
nucleus boundary, ties at the k-th value past the candidates, and a top_k one past the candidate count.
Chunked evaluation: each chunk flushed and synced, a resumed journal's problem count, a damaged rows file, the
chunk size for many samples, what the resume settings cover, the multi-process resume, a done record's index.
generate's row_ids range; a llama3 rope_scaling's band factors; rope_parameters beside an agreeing rope_scaling.
Default stop ids at the vocabulary's edges; GRPO's check of a pad id past the model's rows. A bare rules table
given to load_pretrained without a mesh, or to init_params. GRPO's entropy metric by value; seq-mask-tis refused only
under GSPO."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import recipe
from test_rev32_evalr import BoxedEnv, _tasks

from jaxrl_llm import evaluate, models, parallel, sampling
from jaxrl_llm.evaluation import Chunk, evaluate_tasks
from jaxrl_llm.sampling import strategies as st


def _kept(x: np.ndarray, k, p, candidates: int) -> np.ndarray:
    thr = st.filter_threshold(jnp.asarray(x), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32), candidates)
    return np.asarray(x >= np.asarray(thr)[:, None]).sum(-1)


@pytest.mark.parametrize("candidates", [0, 4])
def test_a_top_p_one_row_beside_a_top_p_row_is_not_filtered(candidates):
    """top_p=1 is off in a batch where another row asks for top-p: every token of its row stays, also those whose
    mass rounds away in fp32 (`top_p < 1` written `<= 1` on either path dropped them), and the other row's nucleus is
    applied (the candidates' `all(top_p >= 1)` written `any` skipped it)."""
    x = np.array([[0.0, -30.0, -31.0, -32.0, -200.0, 1.0]] * 2, np.float32)
    for k, want in (([0, 0], [6, 1]), ([0, 3], [6, 1]), ([3, 3], [3, 1])):
        np.testing.assert_array_equal(_kept(x, k, [1.0, 0.5], candidates), want, err_msg=str(k))


@pytest.mark.parametrize("top_p, n_kept", [(0.5, 1), (0.75, 2), (0.7, 2)])
def test_the_candidates_stop_at_the_token_that_reaches_top_p(top_p, n_kept):
    """The exact boundary test_sampling_mutants checks for top-p alone (bisection), on the candidates path (a top-k
    at most K): a token whose preceding mass equals top_p is left out (`before < top_p` written `<=` kept it)."""
    x = np.log(np.array([[0.5, 0.25, 0.125, 0.125]], np.float32))
    for candidates in (0, 4):
        assert _kept(x, [4], [top_p], candidates)[0] == n_kept, candidates


def test_ties_at_the_kth_value_past_the_candidates_count_in_the_nucleus_mass():
    """Top-2 of (5, 4, 4, 4, 4, 1) keeps 5 and four 4s; 3 candidates hold only two of the 4s. With top_p 0.5 the 5
    holds e/(e+4) = 0.40 of the top-k mass, so the nucleus reaches the 4s; normalised over the candidates alone it
    held e/(e+2) = 0.58 and the nucleus stopped at the 5."""
    x = np.array([[5.0, 4.0, 4.0, 4.0, 4.0, 1.0]], np.float32)
    for candidates in (0, 3):
        assert _kept(x, [2], [0.5], candidates)[0] == 5, candidates


def test_a_top_k_one_past_the_candidates_is_searched_over_the_whole_row():
    """top_k = K + 1 does not fit K candidates: the whole row is searched (a `<= K + 1` fit took the K-th)."""
    x = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    want = -np.sort(-x, axis=-1)[:, 8]
    got = st.filter_threshold(jnp.asarray(x), jnp.full(2, 9, jnp.int32), jnp.ones(2, jnp.float32), 8)
    np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------------------- chunked evaluation
SETTINGS = {"sampling.temperature": 1.0}


def _chunk(i: int) -> Chunk:
    return Chunk([{"index": i, "rewards": [1.0]}], {"timeouts": i})


def _indices(chunks: list[Chunk]) -> list[int]:
    return [r["index"] for c in chunks for r in c.problems]


def test_each_chunk_is_flushed_and_synced_as_it_is_written(tmp_path, monkeypatch):
    """A process killed (SIGKILL, preemption) right after a chunk keeps it: the rows reach the file before the next
    chunk (a dropped flush left them in Python's buffer) and are synced (a dropped fsync left them to the kernel)."""
    path = str(tmp_path / "r.rows.jsonl")
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    j = evaluate.Journal(path, SETTINGS)
    assert j.open(True) == []
    j.append(_chunk(0))
    assert synced == [j._f.fileno()]
    assert _indices(evaluate.Journal(path, SETTINGS).open(True)) == [0]  # read while the writer is still open
    j.close()


def test_a_resumed_journal_counts_the_problems_done_before(tmp_path):
    """A resumed run interrupted again says how many problems its rows file keeps (open() left the count at 0:
    no 'the N problems done are kept' line when stopped before a new chunk)."""
    path = str(tmp_path / "r.rows.jsonl")
    j = evaluate.Journal(path, SETTINGS)
    j.open(True)
    j.append(_chunk(0))
    j.append(_chunk(1))
    j.close()
    j = evaluate.Journal(path, SETTINGS)
    j.open(True)
    assert j.problems == 2


def test_a_damaged_rows_file_keeps_its_whole_chunks(tmp_path):
    """A chunk whose end line counts other rows than precede it is not resumed (its problems run again), and a
    damaged last line (NULs where a crash left data unwritten) is dropped, not refused with every chunk."""
    path = tmp_path / "r.rows.jsonl"
    j = evaluate.Journal(str(path), SETTINGS)
    j.open(True)
    j.append(_chunk(0))
    j.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"index": 1, "rewards": [1.0]}\n{"chunk_end": 2, "env_counts": {}}\n\0\0\0 1]}\n')
    assert _indices(evaluate.Journal(str(path), SETTINGS).open(True)) == [0]
    assert path.read_bytes() == whole


def test_chunk_size_for_many_samples_and_whole_batches():
    """At least one problem per chunk when a problem's samples outnumber the rows (0 was a chunk_size=0 error), and
    the rows rounded down to whole max_batch_size batches (256 rows with batches of 100: 200)."""
    ec = recipe("eval_tiny").eval
    sampled = sampling.SamplingParams(temperature=1.0)
    ec.max_batch_size, ec.n_samples = 0, 2048
    assert evaluate.chunk_problems(ec, sampled) == 1
    ec.max_batch_size, ec.n_samples = 100, 1
    assert evaluate.chunk_problems(ec, sampled) == 200


def test_resume_settings_cover_the_tasks_and_the_resolved_checkpoint():
    """Rows are resumed only for the same tasks (a data file rewritten in place: another gold answer) and the same
    resolved model (model.step=-1 meaning a newer checkpoint with an explicit --out)."""
    c = recipe("eval_tiny")
    tasks = _tasks(["7", "8"])
    info = {"path": "w", "tokenizer": "t", "step": 3}
    base = evaluate.resumed_settings(c, info, tasks)
    assert base == evaluate.resumed_settings(c, dict(info), _tasks(["7", "8"]))
    assert base != evaluate.resumed_settings(c, {**info, "step": 4}, tasks)
    other = [tasks[0], dataclasses.replace(tasks[1], metadata={**tasks[1].metadata, "answer": "9"})]
    assert base != evaluate.resumed_settings(c, info, other)
    # how many scoring processes share a chunk changes no row; how long each may take does
    c.env.num_workers = c.env.get("num_workers", 1) + 3
    assert base == evaluate.resumed_settings(c, info, tasks)
    c.env.timeout_s = 123.0
    assert base != evaluate.resumed_settings(c, info, tasks)


def test_resume_on_several_processes_hands_process_0s_chunks_or_its_error_to_all(tmp_path, monkeypatch):
    """Process 0 reads the rows file, every process gets its chunks, or its ConfigError (process 0 still takes part
    in the gather: raising alone would leave the others waiting in it)."""
    path = str(tmp_path / "r.rows.jsonl")
    j = evaluate.Journal(path, SETTINGS)
    j.open(True)
    j.append(_chunk(0))
    j.close()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for settings, want in ((SETTINGS, [0]), ({"sampling.temperature": 0.5}, "other settings")):
        sent: list = []
        for index in (0, 1):
            monkeypatch.setattr(jax, "process_index", lambda index=index: index)
            monkeypatch.setattr(evaluate.distributed, "allgather_json",
                                lambda obj, sent=sent: sent.append(obj) or [sent[0], obj])
            journal = evaluate.Journal(path if index == 0 else str(tmp_path / "none"), settings)
            if isinstance(want, str):
                with pytest.raises(evaluate.ConfigError, match=want):
                    evaluate.resume_chunks(journal, True)
            else:
                got = evaluate.resume_chunks(journal, True)
                assert _indices(got) == want and got[0].counts == {"timeouts": 0}
        assert len(sent) == 2 and sent[1] is None


def test_done_records_outside_the_tasks_are_a_value_error(tokenizer):
    """done: a record whose index is len(tasks) (or negative), or with another number of rewards than n_samples, is
    named as not fitting the tasks, before any sampling (an off-by-one bound let len(tasks) through to an
    IndexError; 3 rewards for 2 samples reached numpy's reshape error after sampling every other problem)."""
    cfg = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(2,))
    tasks = _tasks(["7", "8"])
    for i, rewards in ((2, [1.0, 0.0]), (-1, [1.0, 0.0]), (0, [1.0, 0.0, 1.0])):
        with pytest.raises(ValueError, match=rf"done: a record with index {i} and {len(rewards)} rewards does not fit "
                                             "2 tasks x 2 samples"):
            evaluate_tasks(cfg, None, tokenizer, tasks, BoxedEnv(), n_samples=2,
                           done=[Chunk([{"index": i, "rewards": rewards}], {})])


# ------------------------------------------------------------------------------------------- row ids, RoPE
def test_row_ids_outside_int32_streams_are_refused():
    """row_ids are the rows' int32 stream ids: 2**31 (wrapped to a negative id), -1 and 0.5 (cast to stream 0) are
    refused before any work."""
    cfg = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8)
    params = models.init_params(cfg, jax.random.key(0))
    for bad in ([0, 2**31], [-1, 0], [0.5, 1.0]):
        with pytest.raises(ValueError, match=r"row_ids: expected 2 integers in \[0, 2\*\*31\)"):
            sampling.generate(cfg, params, [[1], [2]], sampling.SamplingParams(max_new_tokens=1), 0, row_ids=bad)


_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("bad", [0, 0.0, True, "1"])
def test_llama3_band_factors_must_be_positive_numbers(bad):
    """low_freq_factor 0 divides a wavelength by zero (transformers: ZeroDivisionError; here it read as inf), and
    a boolean is no factor."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": bad, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    with pytest.raises(models.UnsupportedModelError, match=rf"needs low_freq_factor > 0 \(got low_freq_factor={bad!r}"):
        models.config_from_hf({**_LLAMA, "rope_scaling": rs})


def test_rope_parameters_beside_an_agreeing_rope_scaling_load():
    """transformers reads rope_scaling alone, its theta from it or from a top-level rope_theta: a pair that agrees that
    way loads (rope_theta beside them, or inside rope_scaling), and is refused when the theta differs."""
    rp = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    for d in ({**_LLAMA, "rope_parameters": rp, "rope_scaling": {"type": "linear", "factor": 2.0},
               "rope_theta": 500000.0},
              {**_LLAMA, "rope_parameters": rp, "rope_scaling": dict(rp)}):
        got = models.config_from_hf(d)
        assert (got.rope_theta, got.rope_scaling.factor) == (500000.0, 2.0)
    with pytest.raises(models.UnsupportedModelError, match="disagree"):
        models.config_from_hf({**_LLAMA, "rope_parameters": rp, "rope_scaling": {**rp, "rope_theta": 10000.0},
                               "rope_theta": 500000.0})


# ------------------------------------------------------------------------------------------- stop ids, pad id
def test_default_stop_ids_leave_out_the_vocabulary_size_and_negative_ids():
    """An eos id equal to vocab_size (one past the last row) or negative (config.json's eos_token_id -1) is no stop
    id: generate refuses both ('outside the vocabulary')."""
    cfg = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(-1, 2, 97))

    class Tok:
        eos_token_id = 96

    assert sampling.default_stop_ids(cfg, Tok()) == (2, 96)


def test_grpo_refuses_a_pad_id_past_the_models_rows(tmp_path):
    """The pad check of test_rev34_hfload (SFT) in a GRPO run: a DataError before any compile (without it the first
    step's loss is NaN)."""
    from test_rev30_tok import _tokenizer

    from jaxrl_llm import train
    from jaxrl_llm.data.chat import DataError

    tok = _tokenizer("qwen2.5")
    vocab = len(tok)
    cfg = models.ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(2,))
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), models.abstract_params(cfg, "float32"))
    models.save_pretrained(cfg, params, str(tmp_path / "model"))
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tasks.jsonl").write_text("".join(f'{{"prompt": "{i} + 1?", "answer": "{i + 1}"}}\n' for i in range(4)))
    c = recipe("grpo_tiny", {"tokenizer": str(tmp_path / "tok"), "model.path": str(tmp_path / "model"),
                             "data.source": str(tmp_path / "tasks.jsonl"), "data.num_examples": -1, "data.options": {},
                             "data.max_prompt_len": 1024})
    with pytest.raises(DataError, match=rf"the tokenizer's pad token '<pad>' \(id {vocab}\) is outside"):
        train.run(c, str(tmp_path / "w"))


def test_a_bare_rules_table_is_refused_without_a_mesh_and_by_init_params(tmp_path):
    """test_rev34_docsnip's TypeError for load_pretrained without a mesh (the one-device mesh's placement read the
    table: "'tuple' object has no attribute 'spec'") and for init_params on a mesh."""
    cfg = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8)
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), models.abstract_params(cfg, "float32"))
    models.save_pretrained(cfg, params, str(tmp_path))
    match = r"rules: expected a parallel\.ShardingRules .*got tuple"
    with pytest.raises(TypeError, match=match):
        models.load_pretrained(str(tmp_path), rules=parallel.DEFAULT_RULES)
    with pytest.raises(TypeError, match=match):
        models.init_params(cfg, 0, mesh=parallel.make_mesh(data=1, fsdp=-1, tensor=1), rules=parallel.DEFAULT_RULES)


def test_grpo_entropy_is_the_sampling_distributions():
    """The entropy _policy_logprobs returns (GRPO's entropy metric) is -sum p log p of softmax(logits / T) at the
    position that predicts each target: test_rev34_grpoflops counts its exp passes and test_logit_chunks compares
    chunked with unchunked, so an entropy of 0 everywhere passed both."""
    from jaxrl_llm.algorithms import grpo

    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape), jnp.float32),
                          models.abstract_params(cfg, "float32"))
    ids = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    attn = jnp.ones_like(ids)
    _, raw, ent = grpo._policy_logprobs(cfg, params, ids, attn, 0.7, 0, 1.0, None, with_entropy=True, first_target=4)
    logp = np.asarray(jax.nn.log_softmax(models.forward(cfg, params, ids, attn) / 0.7, axis=-1), np.float64)
    want = -(np.exp(logp) * logp).sum(-1)[:, 3:-1]
    assert want.min() > 1.0
    np.testing.assert_allclose(np.asarray(ent)[:, 4:], want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(raw)[:, 4:], np.take_along_axis(logp[:, 3:-1], np.asarray(ids)[:, 4:, None],
                                                                          -1)[..., 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("token_level", [True, False])
def test_seq_mask_tis_without_gspo_is_accepted(token_level):
    """The refusal of test_rev34_grpoflops is GSPO's alone: seq-mask-tis with a per-token ratio stays a valid recipe
    (a refusal of every seq-mask-tis recipe passed the suite)."""
    from jaxrl_llm.algorithms import grpo

    over = {"grpo.token_level": token_level, "grpo.importance_correction": True, "grpo.recompute_old_logprobs": True,
            "grpo.tis_cap": 2.0, "grpo.tis_min": 0.5, "grpo.tis_type": "seq-mask-tis"}
    grpo.validate_config(recipe("grpo_tiny", over))
    with pytest.raises(ValueError, match="grpo.tis_type='seq-mask-tis'"):
        grpo.validate_config(recipe("grpo_tiny", {**over, "grpo.token_level": False,
                                                  "grpo.sequence_level_ratio": True}))
