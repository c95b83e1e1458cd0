"""CHAMP gold answers: plain-text math rewritten as LaTeX, so that math-verify rewards the right answers and not
wrong ones (it reads "sum_(k=1)^n 1/k" as the number 1), and counts stated in words reduced to the number."""

from __future__ import annotations

import importlib.util

import pytest

from jaxrl_llm.data.ascii_math import ascii_math_to_latex
from jaxrl_llm.data.tasks import champ_answer

needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="needs math-verify")


@pytest.mark.parametrize("text,latex", [
    ("sum_(k=1)^n 1/k", r"\sum_{k=1}^{n} 1/k"),
    ("2^floor(n/2)*floor(n/2)!", r"2^{\lfloor n/2 \rfloor} \cdot \lfloor n/2 \rfloor!"),
    ("C(n+1, 2m+1)", r"\binom{n+1}{2m+1}"),
    ("((-1)^(n+1)+n+1)/(n+2)", r"((-1)^{n+1}+n+1)/(n+2)"),
    ("(1+sqrt(4a+1))/2", r"(1+\sqrt{4a+1})/2"),
    ("x=±1", r"x=\pm 1"),
    ("x^3−x^2+1", r"x^{3}-x^{2}+1"),
    ("n≥3", r"n\geq 3"),
    ("x^1.5+2^n", r"x^{1.5}+2^{n}"),
    ("aC(1, 2)", "aC(1, 2)"),  # part of a longer name: not a binomial
])
def test_ascii_math_to_latex(text, latex):
    assert ascii_math_to_latex(text) == latex


@pytest.mark.parametrize("raw,gold", [
    ("@@sum_(k=1)^n 1/k@@", r"\sum_{k=1}^{n} 1/k"),
    ("@@C(10, 5)@@, or equivalently @@252@@", "252"),
    ("@@5/14@@, or approximately 35.7%", "5/14"),
    # an aside holding brackets of its own is removed whole
    ("@@((-1)^(n+1)+n+1)/(n+2)@@ (i.e., 1 if for odd @@n@@, and @@n/(n+2)@@ for even @@n@@)",
     r"((-1)^{n+1}+n+1)/(n+2)"),
    ("3 is the only possible value", "3"), ("-3 is the only possible value", "-3"), ("98 values", "98"),
    ("2 inequalities", "2"), ("0 pairs", "0"), ("100 (i.e., all values)", "100"), ("0 (none of the values)", "0"),
    ("At most 0 integer-valued roots (i.e., no integer roots)", "0"),
    ("The limit exists and is equal to @@(a+3b)/2@@", "(a+3b)/2"), ("The limit exists and is equal to 3", "3"),
    ("The only possible value for the limit is @@sqrt(a)@@", r"\sqrt{a}"),
    ("@@n@@ times", "n"), ("@@k-2@@ (i.e., all of them)", "k-2"),
    ("No integer solutions", "No integer solutions"), ("Yes", "Yes"), ("376 and 625", "376 and 625"),
    ("@@x=16@@ and @@x=81@@", "x=16 and x=81"),
    ("Yes, and the sequence is @@1/2^3@@, @@1/2^6@@, ...", "Yes"),  # the question's answer, not the sequence
    ("@@f(x@@", "f(x"),  # unbalanced: kept as written
])
def test_champ_answer(raw, gold):
    assert champ_answer(raw) == gold


@needs_math_verify
def test_champ_golds_reward_right_answers_and_not_wrong_ones():
    """Scored as GRPO and evaluation score them: the gold strings of load_tasks('champ') against answers a model
    writes in LaTeX (right) and answers the old plain-text golds wrongly accepted (\\boxed{1})."""
    pytest.importorskip("champ_dataset")
    from jaxrl_llm.data.tasks import load_tasks
    from jaxrl_llm.environments.math import answers_match

    gold = {t.metadata["id"]: t.metadata["answer"] for t in load_tasks("champ")}
    right = {"P_Inequality_12": r"\sum_{k=1}^{n}\frac{1}{k}", "P_Polynomial_28": r"\frac{(-1)^{n+1}+n+1}{n+2}",
             "P_Combinatorics_3": r"2^{\lfloor n/2\rfloor}\lfloor n/2\rfloor!",
             "P_Combinatorics_16": r"\binom{n+1}{2m+1}",
             "P_Sequence_29": r"\frac{2}{3}", "P_Number-Theory_25": "3", "P_Inequality_33": "98",
             "P_Sequence_16": r"\sqrt{a}", "P_Combinatorics_29": r"\binom{n}{4}"}
    right["P_Sequence_43"] = r"\text{Yes}"
    wrong = {"P_Inequality_12": "1", "P_Polynomial_28": "1", "P_Combinatorics_16": "n+1", "P_Sequence_29": "3",
             "P_Sequence_43": "1"}
    assert [k for k, v in right.items() if not answers_match(gold[k], v, timeout_s=None)] == []
    assert [k for k, v in wrong.items() if answers_match(gold[k], v, timeout_s=None)] == []
