"""Math rewards on final answers as instruct models write them: a "the answer is" sentence in markdown bold,
"Final answer: X", an answer tag holding a sentence, a space as the thousands separator; and a guard that
many boxed answers still score as the last one alone."""

from __future__ import annotations

import pytest

from jaxrl_llm.environments.extract import extract_answer, normalize_number
from jaxrl_llm.environments.math import score_math


@pytest.mark.parametrize("completion", [
    "**The answer is 72**", "**The answer is 72.**", "**The final answer is 72.** Done.", "*The answer is 72*",
    "__The answer is 72__", "So, **the answer is 72**.", "**Final answer: The answer is 72 cookies.**",
])
def test_answer_sentence_in_markdown_emphasis(completion):
    """The closing '**' of a bold sentence was read as part of the answer ("72**"): 0 for a right answer."""
    assert score_math(completion, "72", "auto", None) == (1.0, "72" if "cookies" not in completion else "72 cookies")
    assert score_math(completion.replace("72", "71"), "72", "answer_is", None)[0] == 0.0


def test_emphasis_reading_keeps_products_and_powers():
    assert extract_answer("The answer is 2**10.", "answer_is") == "2**10"
    assert extract_answer("The answer is 2 * 3 * 4.", "answer_is") == "2 * 3 * 4"
    assert extract_answer("The answer is **18**.", "answer_is") == "18"


@pytest.mark.parametrize("completion", [
    "Final answer: 72", "**Final Answer:** 72", "Answer: 72", "Final Answer: The final answer is $72$. I hope it "
    "is correct.", "Answer: I think the answer is 72.", "**Final Answer:** **72**",
])
def test_final_answer_colon(completion):
    """"Final answer: 72" (and the Minerva form) had no answer at all: no_answer, 0."""
    assert score_math(completion, "72", "auto", None)[0] == 1.0
    assert score_math(completion.replace("72", "73"), "72", "auto", None)[0] == 0.0


def test_an_answer_tag_or_last_line_holding_a_sentence_is_the_value_it_states():
    assert score_math("<answer>The answer is 72</answer>", "72", "answer_tag", None) == (1.0, "72")
    assert score_math("<answer>Final answer: 72</answer>", "72", "answer_tag", None)[0] == 1.0
    assert score_math("8 * 9 = 72\nThe answer is 72.", "72", "last_line", None)[0] == 1.0
    assert score_math("<answer>The answer is 71</answer>", "72", "answer_tag", None)[0] == 0.0


def test_space_as_thousands_separator():
    """math-verify reads "1 234" as 1 + 234: \\boxed{1 234} scored 0 against 1234 and 1 against 235."""
    assert normalize_number("1 234") == "1234" and normalize_number("1\u00a0234\u00a0567") == "1234567"
    assert normalize_number("1 23") is None and normalize_number("12 3456") is None
    assert score_math("\\boxed{1 234}", "1234", "boxed", None)[0] == 1.0
    assert score_math("The answer is 1\u00a0234.", "1234", "auto", None)[0] == 1.0
    assert score_math("\\boxed{1 234}", "235", "boxed", None)[0] == 0.0


def test_many_boxes_or_a_chain_score_as_one_answer():
    """Listing answers gains nothing: the last box is the answer, a list or an 'or' is wrong, an empty box none."""
    every = " ".join(f"\\boxed{{{k}}}" for k in range(1, 101))
    assert score_math(every, "72", "auto", None)[0] == 0.0
    assert score_math("\\boxed{" + ", ".join(map(str, range(1, 101))) + "}", "72", "auto", None)[0] == 0.0
    assert score_math("\\boxed{72 \\text{ or } 73}", "73", "auto", None)[0] == 0.0
    assert score_math("\\boxed{x = " + " = ".join(map(str, range(1, 21))) + "}", "7", "auto", None)[0] == 0.0
    assert score_math("The answer is 72 or 73.", "72", "auto", None)[0] == 0.0
    assert score_math("I think it's 72. \\boxed{}", "72", "auto", None) == (0.0, None)


def test_answer_colon_is_a_heading_not_any_remark():
    """"answer: X" counts at a line's start or after the/my/our/final; "Check answer: yes" after the statement was
    taken for the last answer ("yes"), which scored a right answer 0."""
    from jaxrl_llm.environments.extract import extract_answer_is

    assert extract_answer_is("The answer is 18.\nCheck answer: yes") == "18"
    assert extract_answer_is("Check answer: yes") is None
    for text in ("Answer: 9", "  - Answer: 9", "So the final answer: 9.", "My answer: 9", "Hence, final answer: 9"):
        assert extract_answer_is(text) == "9", text
    assert score_math("The answer is 18.\nCheck answer: yes", "18", "auto", None)[0] == 1.0


def test_a_box_stating_the_answer_in_text_is_the_value_it_states():
    """\\boxed{\\text{The answer is } 5} was re-read as "} 5" (a right answer, but a vote of its own in maj@k)."""
    assert score_math("So \\boxed{\\text{The answer is } 5}", "5", "auto", None) == (1.0, "5")
    assert score_math("\\boxed{\\textbf{The answer is } 5}", "5", "auto", None) == (1.0, "5")
    assert score_math("\\boxed{\\mathrm{The\\ answer\\ is\\ } 5}", "5", "auto", None) == (1.0, "5")
    assert score_math("\\boxed{5 \\text{ cm}}", "5", "auto", None)[1] == "5 \\text{ cm}"  # not a statement: kept
