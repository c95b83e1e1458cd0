"""Review 32 (code reward end to end): assert-style tests (no entry point) that import a module's class and compare
the program's results with its instances (`from fractions import Fraction`, `assert f() == Fraction(5, 6)`) pass
a correct program, as README says, and still refuse the program's own classes and subclasses."""

from jaxrl_llm.environments.code import Program, run_program

FRAC_TESTS = "from fractions import Fraction\nassert add_frac('1/2', '1/3') == Fraction(5, 6)\n"


def _run(code: str, tests: str) -> tuple[bool, str | None]:
    return run_program(Program("", code, tests), None)


def test_results_of_the_tests_modules_classes_pass():
    good = "from fractions import Fraction\ndef add_frac(a, b):\n    return Fraction(a) + Fraction(b)\n"
    assert _run(good, FRAC_TESTS) == (True, None)
    counter = "from collections import Counter\ndef cnt(s):\n    return Counter(s)\n"
    assert _run(counter, "from collections import Counter\nassert cnt('aab') == Counter({'a': 2, 'b': 1})\n") == \
        (True, None)
    assert _run(good.replace("+", "-"), FRAC_TESTS)[0] is False


def test_a_programs_subclass_or_patch_of_a_trusted_class_is_still_refused():
    sub = ("from fractions import Fraction\nclass F(Fraction):\n    def __eq__(self, o):\n        return True\n"
           "def add_frac(a, b):\n    return F(0)\n")
    passed, error = _run(sub, FRAC_TESTS)
    assert not passed and "'F'" in error
    patch = ("from fractions import Fraction\nFraction.__eq__ = lambda self, o: True\n"
             "def add_frac(a, b):\n    return Fraction(0)\n")
    from fractions import Fraction

    eq = Fraction.__dict__["__eq__"]
    try:  # (run_program here runs in the test's process: the patch must not outlive the call)
        assert _run(patch, FRAC_TESTS)[0] is False
    finally:
        Fraction.__eq__ = eq
