"""Environments: answer extraction, math-verify rewards, the scoring pool's timeouts and crash recovery,
reasoning-gym tasks, format and combined rewards, make_environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrl_llm.environments import (
    CombinedEnvironment,
    FormatEnvironment,
    MathEnvironment,
    ReasoningGymEnvironment,
    ScoringPool,
    answers_match,
    decode_entry,
    encode_entry,
    extract_answer,
    make_environment,
    normalize_answer,
    normalize_number,
    reasoning_gym_tasks,
)
from jaxrl_llm.environments.extract import extract_boxed

SLACK_S = 4.0  # start-up and scheduling slack on a loaded 2-core machine


# --- scoring functions run by worker processes (module level: picklable by reference) ---------------------------


def double(x):
    return 2 * x


def sleep_forever(x):
    time.sleep(1e6)


def double_or_hang(x):
    if x < 0:
        time.sleep(1e6)
    return 2 * x


def raise_value_error(x):
    raise ValueError(f"bad sample {x}")


def hard_exit(x):
    os._exit(13)


def sleep_briefly(x):
    time.sleep(0.3)
    return x


# --- extraction ----------------------------------------------------------------------------------------------------


def test_boxed_nested_last_complete_and_variants():
    text = r"First \boxed{2}. Then \boxed{\frac{1}{\sqrt{2}}} and finally \boxed{\{1, 2\}}."
    assert extract_boxed(text) == r"\{1, 2\}"
    assert extract_answer(r"a \boxed{\frac{a^{2}}{b}} b", "boxed") == r"\frac{a^{2}}{b}"
    # a truncated last box falls back to the previous complete one; an empty box is not an answer
    assert extract_answer(r"\boxed{12} ... so \boxed{\frac{3}{", "boxed") == "12"
    assert extract_answer(r"\boxed{7} Remember to use \boxed{}.", "boxed") == "7"
    assert extract_answer(r"so $\boxed 5$ it is", "boxed") == "5"
    assert extract_answer(r"\fbox{x+1}", "boxed") == "x+1"
    assert extract_answer(r"\boxedfoo{1}", "boxed") is None
    assert extract_answer("the answer is 3", "boxed") is None


def test_other_formats_and_no_answer():
    gsm = "She sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 1,072\n"
    assert extract_answer(gsm, "hash") == "1,072"
    assert extract_answer("<answer>4</answer> wait <answer> 5 </answer>", "answer_tag") == "5"
    assert extract_answer("<answer> <answer>x</answer>", "answer_tag") == "x"
    assert extract_answer("So the answer is 3.5. Done.", "answer_is") == "3.5"
    assert extract_answer("The final answer is: $\\frac{1}{2}$.", "answer_is") == "$\\frac{1}{2}$"
    # a reason after the answer is not part of it; a list or tuple is
    assert extract_answer("So the answer is 18, since 9 + 9 = 18.", "answer_is") == "18"
    assert extract_answer("The answer is 7, because 3 + 4 = 7", "auto") == "7"
    assert extract_answer("The answer is (1, 2), (3, 4).", "answer_is") == "(1, 2), (3, 4)"
    # ... but words after a comma are an answer of their own (reasoning-gym's word_sorting golds)
    words = "Above, Australia, From, cannot, equipment, vital"
    assert extract_answer(f"The answer is: {words}", "answer_is") == words
    assert extract_answer("The answer is: about, as, by, from, so, which", "auto") == "about, as, by, from, so, which"
    assert extract_answer("The answer is Paris, since it is the capital.", "answer_is") == \
        "Paris, since it is the capital"
    assert extract_answer("work\n\n  17  \n", "last_line") == "17"
    assert extract_answer("Result: 12 then Result: 13", r"Result: (\d+)") == "13"
    # auto: boxed wins over a tag, a tag over ####
    assert extract_answer("<answer>1</answer> \\boxed{2}", "auto") == "2"
    assert extract_answer("#### 3\n<answer>4</answer>", "auto") == "4"
    for fmt in ("boxed", "hash", "answer_tag", "answer_is", "auto", r"Result: (\d+)"):
        assert extract_answer("I am not sure. <answer></answer> ####", fmt) is None, fmt
    with pytest.raises(ValueError, match="boxd"):
        extract_answer("x", "boxd")  # not a format name and no capture group
    with pytest.raises(ValueError, match="valid regex"):
        MathEnvironment(answer_format="(unclosed", num_workers=0, sandbox=False)


@pytest.mark.parametrize("raw, number", [
    ("1,000", "1000"), ("$1,000.50", "1000.5"), ("\\$18", "18"), ("42.", "42"), ("3.5.", "3.5"),
    ("-1,234,567", "-1234567"), ("1{,}000", "1000"), ("1\\,000", "1000"), (".5", "0.5"), ("+7", "7"),
    ("$12$", "12"), ("1,00", None), ("1,2,3", None), ("12,34", None), ("5 cm", None), ("10%", None),
    ("1/2", None), ("x", None),
    # one number, one text: trailing zeros of a decimal and leading zeros go
    ("18.00", "18"), ("18.0", "18"), ("0.50", "0.5"), ("007", "7"), ("-0.0", "0"), ("+4.10", "4.1"), ("100", "100"),
])
def test_normalize_number(raw, number):
    assert normalize_number(raw) == number


def test_normalize_answer_keeps_units_and_lists():
    assert normalize_answer("5 cm") == "5 cm"
    assert normalize_answer("1,2,3") == "1,2,3"
    assert normalize_answer(" $\\frac{1}{2}$ ") == "\\frac{1}{2}"
    assert normalize_answer("Paris.") == "Paris"
    # markdown emphasis, as chat models write their final answer
    assert normalize_answer("**18**") == "18" and normalize_answer("__x+1__") == "x+1"
    assert normalize_answer("**$18**") == "18" and normalize_answer("*7*") == "7"
    assert normalize_answer("2*3*4") == "2*3*4" and normalize_answer("a * b *") == "a * b *"


@pytest.mark.parametrize("gold, pred, same", [
    ("0.5", r"\frac{1}{2}", True), (r"\frac{1}{2}", "0.5", True), ("1000", "1,000", True), ("1000", "$1,000", True),
    ("18", "\\$18.00", True), ("72", "72.", True), (r"\sqrt{2}", r"2^{1/2}", True), ("3", "x = 3", True),
    ("100", "1,00", False), ("2", "3", False), ("1000", "1,001", False), (r"\frac{1}{3}", "0.33", False),
    # a plain-number gold against a number with a unit math-verify does not know (it scored these 0)
    ("18", "18 cookies", True), ("18", r"18 \text{ eggs}", True), ("18", "$18 per hour", True),
    ("1000", "1,000 people", True), ("3.5", "3.50 km.", True), ("18", "19 cookies", False),
    ("2", "2 x", False), ("3", "3 pi", False), ("18", "18 dollars and 5 cents", False), ("5", "5 ft", True),
    # words that make the number another number or a formula are not units
    ("2", "2xy", False), ("6", "6 xy", False), ("2", "2 cubed", False), ("2", "2 thirds", False),
    ("1", "1 million", False), ("1", "1 dozen", False), ("1", "1 half", False), ("3", "3 thousand", False),
    ("3", "3 at most", False), ("5", "5 squared", False), ("5", "5 billion dollars", False),
    ("4", "4 factorial", False), ("10", "10 km squared", False), ("2", "2 arcsin", False),
    ("5", "5 tens", False), ("5", "5 lakhs", False), ("5", "5 crores", False), ("5", "5 grand", False),
    ("5", "5 twelfths", False), ("5", "5 millionths", False), ("5", "5 through seven", False),
    # markdown bold around the answer (what "The final answer is **18**." extracts)
    ("18", "**18**", True), ("18", "**$18**", True), ("19", "**18**", False),
])
def test_answers_match_math_verify(gold, pred, same):
    assert answers_match(gold, pred, timeout_s=5) is same


# --- the scoring pool --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["isolated", "shared"])
def pool(request):
    with ScoringPool(num_workers=2, timeout_s=1.0, isolate=request.param) as p:
        yield p


def test_pool_values_in_order(pool):
    out = pool.map(double, [(i,) for i in range(50)])
    assert [o.status for o in out] == ["ok"] * 50
    assert [o.value for o in out] == [2 * i for i in range(50)]


def test_pool_timeout_kills_and_recovers(pool):
    t0 = time.monotonic()
    out = pool.map(sleep_forever, [(0,)])
    elapsed = time.monotonic() - t0
    assert out[0].status == "timeout" and out[0].value is None
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    # a hung sample among good ones: only it times out (the other worker serves the rest meanwhile)
    t0 = time.monotonic()
    out = pool.map(double_or_hang, [(1,), (-1,), (2,), (3,), (4,)])
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    assert [o.status for o in out] == ["ok", "timeout", "ok", "ok", "ok"]
    assert [o.value for o in out] == [2, None, 4, 6, 8]
    assert [o.value for o in pool.map(double, [(1,), (2,)])] == [2, 4]  # and the next batch is served


def test_pool_error_and_dead_worker(pool):
    out = pool.map(raise_value_error, [(7,), (8,)])
    assert [o.status for o in out] == ["error", "error"]
    assert "ValueError: bad sample 7" in out[0].error
    started = pool.stats["started"]
    out = pool.map(hard_exit, [(0,), (1,)])
    assert [o.status for o in out] == ["error"] * 2
    assert "exit code 13" in out[0].error
    # An isolated sample dies alone (its worker forked it); a sample run in the worker takes the worker with it.
    assert pool.stats["started"] == started + (0 if pool.isolate else 2)
    assert [o.value for o in pool.map(double, [(5,), (6,), (7,)])] == [10, 12, 14]


def test_pool_rejects_unpicklable_function_and_use_after_close():
    p = ScoringPool(num_workers=1, timeout_s=1.0)
    with pytest.raises(ValueError, match="module level"):
        p.map(lambda x: x, [(1,)])
    p.close()
    with pytest.raises(RuntimeError, match="close"):
        p.map(double, [(1,)])


def test_in_process_pool_reports_errors_and_overruns():
    p = ScoringPool(num_workers=0, timeout_s=0.1, sandbox=False)
    out = p.map(raise_value_error, [(1,)]) + p.map(sleep_briefly, [(3,)]) + p.map(double, [(4,)])
    assert [o.status for o in out] == ["error", "timeout", "ok"]
    assert out[1].value is None and out[2].value == 8


# --- math -----------------------------------------------------------------------------------------------------------

GSM_COMPLETION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.fixture(scope="module")
def math_env():
    with MathEnvironment(answer_format="auto", timeout_s=1.5, num_workers=2) as env:
        yield env


def test_math_environment_rewards(math_env):
    completions = [
        GSM_COMPLETION,                                              # correct, GSM8K '####'
        GSM_COMPLETION.replace("#### 72", "#### 71"),                # wrong
        r"Each costs $\frac{3}{4}$ of a dollar, so \boxed{0.75}.",   # correct: 3/4 == 0.75
        "Total: \\boxed{\\$1,250}",                                  # correct, money with a separator
        "I think it is seventy-two.",                                # no answer
    ]
    golds = ["72", "72", r"\frac{3}{4}", "1250", "72"]
    res = math_env.score([""] * 5, completions, [{"answer": g} for g in golds])
    np.testing.assert_array_equal(res.rewards, np.array([1, 0, 1, 1, 0], np.float32))
    assert res.rewards.dtype == np.float32
    assert [i["extracted"] for i in res.info] == ["72", "71", "0.75", "\\$1,250", None]
    assert [i["correct"] for i in res.info] == [True, False, True, True, False]
    assert res.counts == {"timeouts": 0, "errors": 0, "no_answer": 1}


def test_math_environment_pathological_answer_times_out(math_env):
    # sympy never finishes comparing 9^(9^(9^9)) with 1: the sample is killed at the deadline, scores 0
    t0 = time.monotonic()
    res = math_env.score(["", ""], [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"], [{"answer": "1"}, {"answer": "2"}])
    assert time.monotonic() - t0 < 1.5 + SLACK_S
    np.testing.assert_array_equal(res.rewards, [0, 1])
    assert res.counts["timeouts"] == 1 and res.counts["errors"] == 0
    assert "error" in res.info[0]
    res = math_env.score([""], [GSM_COMPLETION], [{"answer": 72}])  # the pool serves the next batch
    np.testing.assert_array_equal(res.rewards, [1])


def test_math_environment_in_process_uses_math_verify_timeouts():
    # no workers: math-verify's own (signal) timeout stops the comparison; the overrun is reported as a timeout
    env = MathEnvironment(answer_format="boxed", timeout_s=1.0, num_workers=0, sandbox=False)
    t0 = time.monotonic()
    res = env.score([""] * 2, [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}"], [{"answer": "1"}, {"answer": "3"}])
    assert time.monotonic() - t0 < 2.0 + SLACK_S
    np.testing.assert_array_equal(res.rewards, [0, 1])
    assert res.counts["timeouts"] == 1


def test_math_environment_bad_input():
    env = MathEnvironment(num_workers=0, sandbox=False)
    with pytest.raises(ValueError, match="lengths"):
        env.score(["a"], ["b", "c"], [{"answer": "1"}])
    with pytest.raises(ValueError, match=r"metadata\[1\] has no 'answer'"):
        env.score(["", ""], ["x", "y"], [{"answer": "1"}, {"gold": "2"}])


# --- reasoning gym ---------------------------------------------------------------------------------------------------


def _rg_base_score(answer: str, gold: str) -> float:
    """reasoning-gym's default rule (ProceduralDataset.score_answer): exact 1; containing the gold len ratio; else 0."""
    if answer == gold:
        return 1.0
    return len(gold) / len(answer) if gold in answer else 0.0


@pytest.mark.parametrize("dataset", ["basic_arithmetic", "leg_counting"])
def test_reasoning_gym_tasks_scored(dataset):
    tasks = reasoning_gym_tasks(dataset, size=4, seed=3, system_prompt="Be brief.")
    assert len(tasks) == 4
    assert tasks[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert "<answer>" in tasks[0].messages[1]["content"]
    meta = json.loads(json.dumps([t.metadata for t in tasks]))  # what a task file would give back
    assert all(m["env"] == "reasoning_gym" and m["rg_dataset"] == dataset for m in meta)
    golds = [m["answer"] for m in meta]
    wrongs = [str(int(g) + 1) for g in golds]
    env = ReasoningGymEnvironment(num_workers=0, sandbox=False)
    completions = [f"Thinking...\n<answer>{g}</answer>" for g in golds] + \
        [f"<answer>{w}</answer>" for w in wrongs] + ["The result is " + golds[0]]
    res = env.score([""] * 9, completions, meta + meta + meta[:1])
    expected = [1.0] * 4 + [_rg_base_score(w, g) for w, g in zip(wrongs, golds, strict=True)] + [0.0]
    np.testing.assert_allclose(res.rewards, expected)
    assert res.counts == {"timeouts": 0, "errors": 0, "no_answer": 1}
    assert res.info[4]["extracted"] == wrongs[0]


def test_reasoning_gym_in_worker_and_unknown_dataset():
    tasks = reasoning_gym_tasks("basic_arithmetic", size=2, seed=0)
    meta = [t.metadata for t in tasks] + [{"rg_dataset": "no_such_dataset", "rg_entry": {}}]
    with ReasoningGymEnvironment(num_workers=1, timeout_s=20.0) as env:
        res = env.score([""] * 3, [f"<answer>{m.get('answer')}</answer>" for m in meta], meta)
    np.testing.assert_array_equal(res.rewards, [1, 1, 0])
    assert res.counts["errors"] == 1 and "no_such_dataset" in res.info[2]["error"]


def test_rg_entry_survives_json_exactly():
    entry = {"grid": ((1, 2), (3, 4)), "s": {3, 1}, "k": {1: "a"}, "n": np.int64(5), "a": np.array([1.5]),
             "l": [None, True, "x"], "tricky": {"__tuple__": 1}}
    back = decode_entry(json.loads(json.dumps(encode_entry(entry))))
    assert back == {"grid": ((1, 2), (3, 4)), "s": {1, 3}, "k": {1: "a"}, "n": 5, "a": [1.5],
                    "l": [None, True, "x"], "tricky": {"__tuple__": 1}}
    assert isinstance(back["grid"][0], tuple)
    with pytest.raises(TypeError, match=r"entry\['bad'\]"):
        encode_entry({"bad": object()})
    # rearc compares tuple grids: the gold answer must still score 1 after a JSON round trip
    meta = json.loads(json.dumps(reasoning_gym_tasks("rearc", size=1, seed=1)[0].metadata))
    env = ReasoningGymEnvironment(num_workers=0, sandbox=False)
    res = env.score([""], [f"<answer>{meta['answer']}</answer>"], [meta])
    np.testing.assert_array_equal(res.rewards, [1])


def test_reasoning_gym_tasks_bad_names():
    with pytest.raises(ValueError, match="no_such_dataset.*valid.*basic_arithmetic"):
        reasoning_gym_tasks("no_such_dataset", size=1, seed=0)
    with pytest.raises(ValueError, match="max_termz.*valid"):
        reasoning_gym_tasks("basic_arithmetic", size=1, seed=0, max_termz=3)


# --- format, combined, make_environment ---------------------------------------------------------------------------


def test_format_environment():
    texts = ["<think>a</think><answer>1</answer>", "no tags", "<answer>\n2\n</answer> trailing"]
    res = FormatEnvironment(reward=0.5).score([""] * 3, texts, [{}] * 3)
    np.testing.assert_array_equal(res.rewards, [0.5, 0, 0.5])
    assert res.counts == {"format_miss": 1}
    full = FormatEnvironment(pattern=r"<think>.*?</think>\s*<answer>.*?</answer>", full_match=True)
    np.testing.assert_array_equal(full.score([""] * 3, texts, [{}] * 3).rewards, [1, 0, 0])


def test_combined_weights_info_and_counts():
    math_env = MathEnvironment(answer_format="answer_tag", num_workers=0, sandbox=False)
    env = CombinedEnvironment([(math_env, 2.0), (FormatEnvironment(reward=1.0), 0.25)])
    texts = ["<answer>4</answer>", "<answer>5</answer>", "4"]
    res = env.score([""] * 3, texts, [{"answer": "4"}] * 3)
    # math: [1, 0, 0]; format: [1, 1, 0]
    np.testing.assert_allclose(res.rewards, [2.0 * 1 + 0.25 * 1, 2.0 * 0 + 0.25 * 1, 0.0])
    assert [i["reward/math"] for i in res.info] == [1.0, 0.0, 0.0]
    assert [i["reward/format"] for i in res.info] == [1.0, 1.0, 0.0]
    assert res.info[0]["math/extracted"] == "4" and res.info[2]["format/format_ok"] is False
    assert res.counts["math/no_answer"] == 1 and res.counts["format/format_miss"] == 1
    assert res.counts["timeouts"] == 0 and res.counts["errors"] == 0
    with pytest.raises(ValueError, match="names must differ"):
        CombinedEnvironment([(FormatEnvironment(), 1.0), (FormatEnvironment(), 1.0)])


def test_make_environment():
    from ml_collections import ConfigDict

    env = make_environment({"name": "math", "answer_format": "hash", "timeout_s": 2.0, "num_workers": 0,
                            "sandbox": False})
    assert isinstance(env, MathEnvironment) and env.answer_format == "hash" and env.timeout_s == 2.0
    spec = ConfigDict({"name": "combined", "components": [
        {"name": "math", "weight": 1.0, "num_workers": 0, "sandbox": False, "answer_format": "answer_tag"},
        {"name": "format", "weight": 0.5, "label": "tags"}]})
    env = make_environment(spec)
    assert isinstance(env, CombinedEnvironment)
    assert [(e.name, w) for e, w in env.components] == [("math", 1.0), ("tags", 0.5)]
    res = env.score([""], ["<answer>3</answer>"], [{"answer": "3"}])
    np.testing.assert_allclose(res.rewards, [1.5])
    with pytest.raises(ValueError, match="'mathh'.*valid.*'math'"):
        make_environment({"name": "mathh"})
    with pytest.raises(ValueError, match="unknown key 'timeout'.*timeout_s"):
        make_environment({"name": "math", "timeout": 5.0})
    with pytest.raises(ValueError, match=r"components\[1\].*unknown key 'weigth'"):
        make_environment({"name": "combined", "components": [{"name": "format"}, {"name": "format", "weigth": 1}]})
    with pytest.raises(ValueError, match="missing key 'name'"):
        make_environment({"answer_format": "boxed"})


def test_import_is_light():
    code = ("import sys, jaxrl_llm.environments; "
            "print(sorted(m for m in ('jax', 'math_verify', 'reasoning_gym', 'sympy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_scoring_workers_outlive_a_sigterm_to_the_process_group(tmp_path):
    """SIGTERM to the whole process group (timeout, SLURM, the launcher) killed the scoring workers mid-sample: the
    trainer, which finishes its step on SIGTERM, got 'worker died' errors scored as reward 0 and saved the update
    made from them."""
    script = tmp_path / "group_term.py"
    script.write_text(
        "import os, signal, threading, time\n"
        "from jaxrl_llm.environments.pool import ScoringPool\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True))  # the trainer carries on\n"
        "with ScoringPool(num_workers=2, timeout_s=20.0) as pool:\n"
        "    pool.map(abs, [(-1,), (-2,)])\n"
        "    threading.Timer(0.5, lambda: os.killpg(0, signal.SIGTERM)).start()\n"
        "    print([o.status for o in pool.map(time.sleep, [(2,), (2,)])], flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["TERM", "['ok',", "'ok']"], r.stdout
