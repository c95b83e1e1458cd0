"""The operand check of tests that run in their program's process (code.py's `run_program`, `check_returns`).

Without an entry point, assert-style tests call the program's functions and classes and compare what they get
with expected values in their own process, where an object whose `__eq__` says yes to anything (or whose `__sub__`
makes any difference zero) passes any test. The tests are compiled with each operand of their comparisons and
arithmetic passed through `operand_check` first (`check_operands`, literals aside), which refuses an object, or an
item of a container it is, whose class takes an operator method (`OPERATOR_METHODS`) from Python code other than
that of the trusted classes: the prelude's, those of the modules the tests use, and the tests' own (each class the
tests define is handed to `trust` as it is made, after its decorators: a dataclass's generated `__eq__` is the
tests'). A trusted class's operator methods are taken as they were before the program ran (a program that patches
`ListNode.__eq__` or `Fraction.__eq__` is seen to), the attributes of a trusted instance whose operators may
compare them are checked too, and a class of the program's built on a trusted one that has operators is refused.
Containers are read by their built-in methods: a subclass's own `__iter__` or `values()` cannot hide an item; so are
the built-in holders that compare by what they hold (a mappingproxy, a SimpleNamespace, a slice, a dict view) and
numpy's object arrays.
"""

from __future__ import annotations

import ast
import collections
import gc
import types
from typing import Any

import numpy as np

from jaxrl_llm.environments.code_values import in_c

# The methods that an operator hands the other operand to (in a test, the expected value): an object whose class
# defines one in Python code can equal anything or make any difference zero.
OPERATOR_METHODS = frozenset([f"__{n}__" for n in "eq ne lt le gt ge contains neg pos abs invert round trunc floor "
                              "ceil".split()] +
                             [f"__{p}{n}__" for n in "add sub mul matmul truediv floordiv mod divmod pow lshift "
                              "rshift and xor or".split() for p in ("", "r", "i")])
OPERAND = "__operand_check__"  # the name the tests' checked operators call
TESTS_CLASS = "__tests_class__"  # the name of the decorator that makes the tests' classes known to OPERAND
CHECKED_ITEMS = 100_000  # objects checked per value (beyond: unchecked)
PLAIN_DATA = (list, dict, set, frozenset, tuple, str, bytes, bytearray, int, float, complex, bool, type(None))
_SCALAR_TYPES = frozenset((int, float, str, bool, bytes, complex, type(None)))  # (exact: no class's __eq__)
_SCALARS = frozenset(id(t) for t in _SCALAR_TYPES)
_ITERATE = ((list, list.__iter__), (tuple, tuple.__iter__), (set, set.__iter__), (frozenset, frozenset.__iter__),
            (collections.deque, collections.deque.__iter__))
# built-in classes whose comparisons compare what they hold, which they do not show as a container's items
_HOLDERS = (types.MappingProxyType, types.SimpleNamespace, slice, type({}.keys()), type({}.values()), type({}.items()))
Trusted = dict[int, tuple[type, dict[str, Any]]]  # class id -> (the class, its operator methods)


def items(x: Any) -> list[Any]:
    """The items of a list, tuple, set, frozenset or deque, or a dict's keys and values, that are not scalars
    (int, float, str, ...: skipped by their types at C speed), read by the built-in classes' own methods; what a
    built-in holder that compares by its contents holds (a mappingproxy's mapping, a SimpleNamespace's or a slice's
    values, a dict view's dict), and an object array's items."""
    if isinstance(x, dict):
        out = [*dict.keys(x), *dict.values(x)]
    elif isinstance(x, _HOLDERS):
        out = gc.get_referents(x)  # (what the C type holds, as its comparison reads it)
    elif isinstance(x, np.ndarray) and x.dtype.hasobject:
        out = x.ravel()[:CHECKED_ITEMS].tolist()
    else:
        out = next(([*it(x)] for kind, it in _ITERATE if isinstance(x, kind)), [])
    return [] if set(map(type, out)) <= _SCALAR_TYPES else [v for v in out if type(v) not in _SCALAR_TYPES]


def _literal(node: ast.expr) -> bool:
    """Whether the expression is a literal (`3`, `-1.5`, `[1, (2, 'a')]`, `{'a': None}`): built-in values only."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _literal(k) for k in node.keys) and all(_literal(v) for v in node.values)
    return False


def _located(node: ast.expr, at: ast.AST) -> ast.expr:
    for k in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
        setattr(node, k, getattr(at, k))
    return node


def _wrap(node: ast.expr) -> ast.expr:
    return node if _literal(node) else _located(ast.Call(_located(ast.Name(OPERAND, ast.Load()), node), [node], []),
                                                node)


def check_operands(tree: ast.Module) -> ast.Module:
    """The tests (changed in place) with each operand of their comparisons and arithmetic that is not a literal
    passed through `OPERAND` first, and their classes handed to `TESTS_CLASS` as they are made (after their other
    decorators)."""
    for node in ast.walk(tree):  # (each node's children are taken before it is changed)
        if isinstance(node, ast.Compare):
            node.left, node.comparators = _wrap(node.left), [_wrap(c) for c in node.comparators]
        elif isinstance(node, ast.BinOp):
            node.left, node.right = _wrap(node.left), _wrap(node.right)
        elif isinstance(node, ast.ClassDef):
            node.decorator_list.insert(0, _located(ast.Name(TESTS_CLASS, ast.Load()), node))
    return tree


def operator_methods(classes: Any) -> Trusted:
    """Each class of Python code among `classes` and their bases, by id, with its operator methods as they are
    now (taken before the program runs)."""
    return {id(c): (c, {k: v for k, v in vars(c).items() if k in OPERATOR_METHODS})
            for kind in classes for c in kind.__mro__ if not in_c(c)}


def trust(trusted: Trusted, allowed: set[int], kind: Any) -> Any:
    """A class the tests define (`TESTS_CLASS`), made known to their operand check and to the check of what the
    program's functions return (`allowed`)."""
    if isinstance(kind, type):
        trusted[id(kind)] = (kind, {k: v for k, v in vars(kind).items() if k in OPERATOR_METHODS})
        allowed.add(id(kind))
    return kind


def _slots(cls: type) -> tuple[str, ...]:
    slots = vars(cls).get("__slots__", ())
    return tuple(k for k in ((slots,) if isinstance(slots, str) else slots) if not k.startswith("__"))


def operand_check(trusted: Trusted) -> Any:
    """What the tests' operators pass each operand through (see the module doc): the operand, or TypeError naming
    its class and the operator method that is Python code of the program's or a library's."""
    cleared: dict[int, type] = {}  # classes written in C (held, so that their ids are not reused)

    def check(value: Any) -> Any:
        if id(type(value)) in _SCALARS:  # (the tests' own arithmetic, at speed)
            return value
        stack, seen = [value], 0
        while stack and seen < CHECKED_ITEMS:
            x = stack.pop()
            seen += 1
            kind = type(x)
            if cleared.get(id(kind)) is not kind:
                python = [cls for cls in kind.__mro__ if not in_c(cls)]
                hooks, program = [], False  # (operator methods of trusted classes; a class of the program's)
                for cls in python:
                    own = {k: v for k, v in vars(cls).items() if k in OPERATOR_METHODS and v is not None}
                    known = trusted.get(id(cls))  # (the classes are held: no id reused)
                    hook = next((k for k, v in own.items() if (known is None or known[1].get(k) is not v) and not (
                        isinstance(v, types.FunctionType) and v.__code__.co_filename == "<tests>")), None)
                    program, hooks = program or known is None, hooks + (list(own) if known else [])
                    if hook is not None or (program and hooks):  # (or a class of the program's on a trusted one)
                        raise TypeError(f"the tests compare or compute with an instance of {kind.__name__!r}, whose "
                                        f"{hook or hooks[0]} is Python code of the program's or a library's "
                                        "(env.check_returns): return built-in values (int, float, str, list, dict, "
                                        "...)")
                if not python:
                    cleared[id(kind)] = kind
                if hooks:  # (all its classes trusted: none of the program's code runs here)
                    stack.extend(getattr(x, "__dict__", {}).values())
                    stack.extend(getattr(x, k, None) for c in python for k in _slots(c))
            stack.extend(items(x))
        return value

    return check
