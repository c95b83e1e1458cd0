"""How values cross between a program's process and its tests' process (code_split.py): pickles that the tests'
side loads without running any code of the program's.

What crosses: plain data (numbers, strings, bytes, None, and tuples, lists, dicts and sets of them), complex,
bytearray, range, slice, Ellipsis; numpy arrays and scalars of non-object dtypes (as dtype, shape and bytes);
dict subclasses the language defines in C (OrderedDict, defaultdict) as the dicts they are; and instances of the
classes the task's prelude defines, as (class name, attribute dict): the receiving side builds an instance of its
own class of that name (on the tests' side, the prelude's, which the program never touched) and sets its
attributes, so no method of the program's runs there. Anything else is refused by the tests' side
(`Receiver.find_class`). Functions and classes defined by the tests or the program cannot cross.
"""

from __future__ import annotations

import ast
import builtins
import collections
import io
import pickle
import sys
import types
from collections.abc import Mapping
from typing import Any

_BUILTINS = frozenset({"complex", "range", "slice", "Ellipsis", "dict"})  # (bytearrays: their own opcode)
PROGRAM_MODULE = "__completion__"


def prelude_class_names(prelude: str) -> list[str]:
    """The names of the classes the prelude defines at its top level."""
    try:
        tree = ast.parse(prelude)
    except (SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.ClassDef)]


def classes_in(namespace: Mapping[str, Any], names: list[str]) -> dict[str, type]:
    return {n: namespace[n] for n in names if isinstance(namespace.get(n), type)}


def _instance(name: str) -> Any:
    """(A name for pickles to refer to: `Receiver.find_class` answers it with `Receiver._new`.)"""
    raise pickle.UnpicklingError("instances are loaded by code_values.loads")


def _ndarray(dtype: str, shape: tuple[int, ...], data: bytes) -> Any:
    import numpy as np

    kind = np.dtype(dtype)
    if kind.hasobject:
        raise pickle.UnpicklingError("an array of Python objects cannot cross")
    return np.frombuffer(data, dtype=kind).reshape(shape).copy()


def _scalar(dtype: str, data: bytes) -> Any:
    return _ndarray(dtype, (), data)[()]


class _Builder:
    """A function as `Receiver` hands it out: a pickle's BUILD on it fails (no attributes), where on the function
    itself it would change this module's function for the rest of the process."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


class Sender(pickle.Pickler):
    """Pickles a value for the other process; instances of the prelude's classes (`names`: class -> name) go bare
    (their states travel apart, `dumps`), so a long linked list does not nest one pickling call per node."""

    def __init__(self, file: io.BytesIO, names: Mapping[type, str]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._names = names

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        name = self._names.get(kind)
        if name is not None:
            return _instance, (name,)
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray | np.generic) and not obj.dtype.hasobject \
                and obj.dtype.fields is None:
            if isinstance(obj, np.generic):
                return _scalar, (obj.dtype.str, obj.tobytes())
            return _ndarray, (obj.dtype.str, obj.shape, obj.tobytes())
        if isinstance(obj, dict) and kind is not dict and in_c(kind):  # OrderedDict, defaultdict
            return dict, (dict(obj),)
        return NotImplemented


def in_c(kind: type) -> bool:
    """Whether a class is written in C (Py_TPFLAGS_IMMUTABLETYPE, which no class defined by Python code has; not
    Py_TPFLAGS_HEAPTYPE's absence: Python 3.12+ makes heap types of some, such as defaultdict and deque)."""
    return bool(kind.__flags__ & (1 << 8))


def _state(obj: Any) -> dict[str, Any]:
    """An instance's attributes (its __dict__ and its slots), refused for kinds a bare instance cannot stand for."""
    kind = type(obj)
    if any(in_c(c) for c in kind.__mro__[1:-1]) or any(
            "__new__" in vars(c) for c in kind.__mro__[:-1]):
        raise TypeError(f"an instance of the prelude's {kind.__name__!r} cannot cross between the processes: a class "
                        "with a built-in base (tuple, list, dict, Enum's) or a __new__ of its own")
    state = dict(getattr(obj, "__dict__", {}))
    for c in kind.__mro__[:-1]:
        for slot in _slots(c):
            if hasattr(obj, slot):
                state[slot] = getattr(obj, slot)
    return state


def _instances(value: Any, names: Mapping[type, str], first: list[Any]) -> list[Any]:
    """The prelude instances reachable from `value` (through containers and their attributes), `first` first, each
    once, in a fixed order (breadth first)."""
    found = {id(o): o for o in first}
    order = list(first)
    queue = collections.deque([value, *(_state(o) for o in first)])
    while queue:
        x = queue.popleft()
        kind = type(x)
        if kind in names:
            if id(x) not in found:
                found[id(x)] = x
                order.append(x)
                queue.append(_state(x))
        elif kind in (list, tuple, set, frozenset):
            queue.extend(x)
        elif isinstance(x, dict):
            queue.extend(x.keys())
            queue.extend(x.values())
    return order


def dumps(value: Any, classes: Mapping[str, type], first: list[Any] = ()) -> tuple[bytes, list[Any]]:
    """(the pickle of `value` for the other process, the prelude instances it carries, `first` first)."""
    names = {cls: name for name, cls in classes.items()}
    insts = _instances(value, names, list(first))
    buf = io.BytesIO()
    sender = Sender(buf, names)  # one memo: the instances (bare), then each one's state, last first, then the value
    sender.dump(insts)
    for o in reversed(insts):  # (breadth first reversed: an instance's attributes are set before its holders' are
        sender.dump(_state(o))  # loaded, so a set or dict key of them hashes them complete)
    sender.dump(value)
    return buf.getvalue(), insts


class Receiver(pickle.Unpickler):
    """Loads what `Sender` writes, and nothing that can run code: no class or function but those listed above;
    instances only of `classes` (the receiving side's own); `reuse`: objects that the first instances of the pickle
    stand for (those this side sent, whose states come back)."""

    def __init__(self, data: bytes, classes: Mapping[str, type], reuse: list[Any] = (), trusted: bool = False):
        super().__init__(io.BytesIO(data))
        self._classes = classes
        self._reuse = list(reuse)
        self._made = 0
        self._trusted = trusted
        self.sealed = False  # set once the instance list is loaded: no instance is made after it

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if module == __name__ and name == "_instance":
            return self._new
        if module == __name__ and name in ("_ndarray", "_scalar"):
            return _Builder(globals()[name])
        if self._trusted:  # the program's process loading what the tests pass (`key=len`)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the program's process sent {module}.{name}: a result must be plain data, "
                                     "numbers, numpy arrays or instances of the prelude's classes")

    def _new(self, name: str) -> Any:
        if self.sealed:
            raise pickle.UnpicklingError("the program's process sent an instance outside its instance list")
        cls = self._classes.get(name)
        if cls is None:
            raise pickle.UnpicklingError(f"the program's process sent an instance of {name!r}, not a class of the "
                                         "prelude")
        i, self._made = self._made, self._made + 1
        if i < len(self._reuse):
            if type(self._reuse[i]) is not cls:
                raise pickle.UnpicklingError("the program's process sent back an instance of another class")
            return self._reuse[i]
        return cls.__new__(cls)


_CALLABLES = (type, _Builder, types.MethodType, types.BuiltinFunctionType, types.FunctionType)


def _no_callables(value: Any, insts: list[Any]) -> None:
    """Refuse a class or function among the loaded values or attributes (the few a reply may name, for its own
    constructions): set as an attribute it would stand in for a method of the prelude's (t.contains = complex)."""
    queue, seen = collections.deque([value, *(vars(o) for o in insts if hasattr(o, "__dict__"))]), set()
    for o in insts:
        queue.extend(getattr(o, a) for c in type(o).__mro__[:-1] for a in _slots(c) if hasattr(o, a))
    while queue:
        x = queue.popleft()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, _CALLABLES):
            raise pickle.UnpicklingError("the program's process sent a class or function as a value")
        if type(x) in (list, tuple, set, frozenset):
            queue.extend(x)
        elif type(x) is dict:
            queue.extend(x.keys())
            queue.extend(x.values())


def _slots(c: type) -> list[str]:
    slots = vars(c).get("__slots__", ())
    return [a for a in ([slots] if isinstance(slots, str) else slots) if a not in ("__dict__", "__weakref__")]


def loads(data: bytes, classes: Mapping[str, type], reuse: list[Any] = (), trusted: bool = False
          ) -> tuple[Any, list[Any]]:
    """(the value, the prelude instances it carried, `reuse` first), each instance's attributes set (replaced, for
    those of `reuse`) as the sender had them. `trusted`: the sender is the tests' process (the program's process
    loading its arguments), whose other functions and classes load as pickle does."""
    receiver = Receiver(data, classes, reuse, trusted)
    try:
        insts = receiver.load()
        receiver.sealed = not trusted  # (what the tests send may hold instances inside objects not walked)
        if not isinstance(insts, list):
            raise pickle.UnpicklingError("the program's process sent a reply of another form")
        for obj in reversed(insts):
            state = receiver.load()
            if not (isinstance(state, dict) and all(isinstance(k, str) and not k.startswith("__") for k in state)):
                raise pickle.UnpicklingError("the program's process sent an instance's attributes of another form")
            if hasattr(obj, "__dict__"):
                vars(obj).clear()
            for k, v in state.items():
                object.__setattr__(obj, k, v)
        value = receiver.load()
        if not trusted:  # (a BUILD in the value's pickle may have set attributes again)
            for obj in insts:
                if not all(isinstance(k, str) and not k.startswith("__") for k in getattr(obj, "__dict__", {})):
                    raise pickle.UnpicklingError("the program's process sent an instance's attributes of another "
                                                 "form")
            _no_callables(value, insts)
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # a malformed pickle (BUILD on a function, a bad dtype, a truncated stream, ...)
        raise pickle.UnpicklingError(f"the program's process sent a malformed reply: {type(e).__name__}: {e}"
                                     ) from None
    return value, insts
