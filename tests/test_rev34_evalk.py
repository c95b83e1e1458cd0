"""Evaluation review: maj@k and empty answers."""

from __future__ import annotations

from jaxrl_llm.evaluation import majority_correct


def test_an_empty_answer_does_not_outvote_a_real_one():
    """maj@3 of ("", "", "7") with 7 right was False: two empty extractions (a scorer's "" or \\boxed{$ $}) won."""
    assert majority_correct(["", "", "7"], [False, False, True])
    assert majority_correct(["$ $", " ", "7"], [False, False, True])
    assert not majority_correct(["", "8", "8", "7"], [False, False, False, True])
    assert not majority_correct(["", " "], [False, False])
