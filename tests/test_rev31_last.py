"""Review of the latest commits: 'Answer: X' at a sentence's start on one line counts (2f852cb's heading-only rule
read '... = 18. Answer: 18' as no answer: a right answer scored 0)."""

from jaxrl_llm.environments.extract import extract_answer_is
from jaxrl_llm.environments.math import score_math


def test_answer_colon_at_a_sentences_start_counts():
    assert extract_answer_is("Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. Answer: 18") == "18"
    assert extract_answer_is("So she makes $18 a day! **Answer:** $18.") == "$18"
    assert score_math("9 * 2 = 18. Answer: 18", "18", "auto", None)[0] == 1.0
    # still not any "... answer:": a check after the statement, a colon label
    assert extract_answer_is("The answer is 18. Check answer: yes") == "18"
    assert extract_answer_is("Final Answer: 42\n\nNote: answer: none") == "42"
