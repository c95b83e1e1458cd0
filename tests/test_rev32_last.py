"""Review 32 (last): the code reward's check of what the program's functions return accepts the classes of the
modules the tests use (2a9d926), but only their public ones: a module's private class (unittest.mock's _ANY, whose
instance ANY equals anything) stays refused when the tests import something else of its module."""

from jaxrl_llm.environments.code import Program, run_program

ANY_PROGRAM = "from unittest.mock import ANY\ndef f(x):\n    return ANY\n"


def test_a_private_class_of_a_module_the_tests_use_is_refused_as_a_result():
    """Tests that import unittest.mock's patch (to feed input(), say) made every class of unittest.mock an allowed
    result: a program returning mock.ANY passed `assert f(3) == 7` (its operand check trusts the module's classes)."""
    passed, error = run_program(Program("", ANY_PROGRAM, "from unittest.mock import patch\nassert f(3) == 7\n"), None)
    assert not passed and "'_ANY'" in error
    passed, error = run_program(Program("", ANY_PROGRAM.replace("return ANY", "return [ANY]"),
                                        "import unittest.mock\nassert f(3) == [7]\n"), None)
    assert not passed and "'_ANY'" in error
    tests = "from unittest.mock import patch\ndef check(candidate):\n    assert candidate(3) == 7\n"
    passed, error = run_program(Program("", ANY_PROGRAM, tests), "f")
    assert not passed and "'_ANY'" in error


def test_a_public_class_of_a_module_the_tests_use_still_passes():
    good = "from fractions import Fraction\ndef f(x):\n    return Fraction(x, 6)\n"
    assert run_program(Program("", good, "import fractions\nassert f(5) == fractions.Fraction(5, 6)\n"), None) == \
        (True, None)
