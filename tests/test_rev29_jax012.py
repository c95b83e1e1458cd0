"""Python 3.12+ and jax 0.12 compatibility (review 29, jax012): behaviour that must not depend on the interpreter or
jax version a user's `pip install` picks."""

import collections
import decimal
import fractions

import pytest

from jaxrl_llm.environments.code import _check_plain


class _AlwaysEqual:
    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value", [collections.defaultdict(int, a=2), collections.deque([1, 2]),
                                   collections.OrderedDict(a=1), decimal.Decimal("1.5"), {"k": [(1, 2.0, "s")]}])
def test_check_returns_accepts_values_of_c_classes_on_every_python(value):
    """Python 3.12 made defaultdict and deque heap types (3.13 Decimal too): a correct program returning one must
    still pass env.check_returns, as on 3.11, not score 0 as 'a class defined in Python code'."""
    _check_plain(value, "f", frozenset())


class _Dict(dict):
    pass


@pytest.mark.parametrize("value", [_AlwaysEqual(), [_AlwaysEqual()], collections.deque([1, _AlwaysEqual()]),
                                   collections.defaultdict(int, a=_AlwaysEqual()), _Dict(), collections.Counter("ab"),
                                   fractions.Fraction(1, 2)])
def test_check_returns_refuses_python_classes_also_inside_a_deque(value):
    with pytest.raises(TypeError, match="a class defined in Python code"):
        _check_plain(value, "f", frozenset())


def test_a_defaultdict_result_crosses_to_the_tests_process_as_the_dict_it_is():
    """code_split's default mode: on Python 3.12+ a defaultdict (a heap type there) was refused by the tests' side
    ('a result must be plain data'), so a correct program returning one scored 0."""
    from jaxrl_llm.environments import code_values

    data, _ = code_values.dumps({"x": collections.defaultdict(int, a=2), "o": collections.OrderedDict(b=1)}, {})
    assert code_values.loads(data, {})[0] == {"x": {"a": 2}, "o": {"b": 1}}

