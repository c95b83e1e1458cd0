"""Review of the latest commits: 'answer:' headings after a list marker or a connective still count."""

import pytest

from jaxrl_llm.environments.extract import extract_answer, extract_answer_is


@pytest.mark.parametrize("text, want", [
    ("Let me compute.\n1. 3+4 = 7\n2. Answer: 7", "7"),
    ("1) Answer: 7", "7"),
    ("(a) Answer: 7", "7"),
    ("Step 1: 2+2=4\nStep 2: Answer: 4", "4"),
    ("We get 7.\n\nCorrect answer: 7", "7"),
    ("The options are (A) 3 and (B) 5.\nCorrect Answer: B", "B"),
    ("So we need 3 more.\nTherefore, answer: 42", "42"),
    ("Hence, Answer: 7", "7"),
    ("So the correct answer: 42", "42"),
    ("- **Final Answer:** 42", "42"),
])
def test_answer_colon_heading_forms(text, want):
    assert extract_answer_is(text) == want
    assert extract_answer(text, "auto") == want


@pytest.mark.parametrize("text, want", [
    ("The answer is 18.\nCheck answer: yes", "18"),
    ("The answer is 5.\n```python\nprint('Answer: ' + str(x))\n```", "5"),
])
def test_answer_colon_not_any_word_before(text, want):
    assert extract_answer_is(text) == want
