"""Final answers as SmolLM2-135M-Instruct actually writes them (endings of its completions on GSM8K and on
reasoning-gym chain_sum with the \\boxed{} instruction, kept as fixed strings): "X is the answer", "the final
answer to the problem is X", and the \\boxed{} instruction repeated ("The answer is within \\boxed{}.")."""

from __future__ import annotations

import pytest

from jaxrl_llm.environments.extract import extract_answer
from jaxrl_llm.environments.math import score_math

# (completion ending, the value it states)
_STATED = [
    ("3. Add the results: 46 + 37 = 103.\n\nTherefore, the final answer to the given arithmetic problem is 103.",
     "103"),
    ("0 - 9 =\n\nThe final answer to the arithmetic problem is 9.", "9"),
    ("4. Now, we add up the total cost of each type of clothing item.\n5. So, 1225 + 1225 = 2475.\n\n"
     "So, 2475 is the final answer.", "2475"),
    ("Now, multiply 11 by 0 to get 0\n\nSo, 0 is the final answer.", "0"),
    ("Final number of meals = 90 + 1 = 101\n\nTherefore, 101 is the answer because 101 = 33 + 1", "101"),
    ("98 - 63 = 21\n\nSo, 21 is the answer.\n\nYour final answer is within the specified error-free and clear "
     "mathematical explanation.", "21"),
    ("3. Calculate the result: 39 is the final answer.\n\nThe answer is 39.", "39"),
    ("So, 8 is the answer.\n\nThe answer is: 8", "8"),
    ("a. First, we multiply 1 by 2 to get 2, which is the answer.", "2"),
    ("So, 12 is the correct answer.", "12"),
]


@pytest.mark.parametrize("completion, value", _STATED)
def test_stated_answers_of_a_small_instruct_model(completion, value):
    """These had no answer (no_answer, 0 when right) or the instruction's echo for one ("within the specified
    ... explanation" was taken over "21 is the answer")."""
    assert extract_answer(completion, "auto") == value
    assert score_math(completion, value, "auto", None) == (1.0, value)
    wrong = str(int(value) + 1)
    assert score_math(completion, wrong, "auto", None)[0] == 0.0


@pytest.mark.parametrize("completion", [
    "3. Add the result to the original number: 56 + 3 = 69\n\nThe answer is within \\boxed{}.",
    "So, 180 minutes is 30200 meters.\n\nThe answer is within \\boxed{}, which is 30200.",
    "This is the answer to the original question.",
    "This is the answer to the provided arithmetic problem.",
    "Let me break it down step-by-step and put the final answer within \\boxed{}:",
])
def test_no_stated_answer(completion):
    """The \\boxed{} instruction repeated is where an answer goes, not one ("within \\boxed{}" was extracted)."""
    assert extract_answer(completion, "auto") is None
    assert score_math(completion, "30200", "auto", None) == (0.0, None)


def test_the_last_statement_wins_either_way_round():
    assert extract_answer("18 is the answer to part one. The answer is 20.", "answer_is") == "20"
    assert extract_answer("The answer is 20. Checking again, 18 is the final answer.", "answer_is") == "18"
    assert extract_answer("x = 18 is the answer", "answer_is") == "18"
    assert extract_answer("So, $18 is the answer.", "answer_is") == "$18"
    assert extract_answer("The answer to 5 - 9 is 3. The answer is 4.", "answer_is") == "4"
    assert extract_answer("Is 18 the answer? No.", "answer_is") is None
    assert extract_answer("1.18 is not the answer.", "answer_is") is None
    assert extract_answer("The remainder is 2, which is the answer's last digit.", "answer_is") is None
