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
import io
import pickle
import sys
from collections.abc import Mapping
from typing import Any

_BUILTINS = frozenset({"complex", "bytearray", "range", "slice", "Ellipsis", "dict"})
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
    """(In the program's process, loading the tests' arguments) a bare instance of its class `name`."""
    cls = vars(sys.modules[PROGRAM_MODULE]).get(name)
    if not isinstance(cls, type):
        raise pickle.UnpicklingError(f"the program defines no class {name!r}")
    return cls.__new__(cls)


def _ndarray(dtype: str, shape: tuple[int, ...], data: bytes) -> Any:
    import numpy as np

    kind = np.dtype(dtype)
    if kind.hasobject:
        raise pickle.UnpicklingError("an array of Python objects cannot cross")
    return np.frombuffer(data, dtype=kind).reshape(shape).copy()


def _scalar(dtype: str, data: bytes) -> Any:
    return _ndarray(dtype, (), data)[()]


class Sender(pickle.Pickler):
    """Pickles a value for the other process; `classes`: the prelude's classes (by name) sent as name + state."""

    def __init__(self, file: io.BytesIO, classes: Mapping[str, type]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._names = {cls: name for name, cls in classes.items()}

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        name = self._names.get(kind)
        if name is not None:
            return _instance, (name,), getattr(obj, "__dict__", None)
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray | np.generic) and not obj.dtype.hasobject \
                and obj.dtype.fields is None:
            if isinstance(obj, np.generic):
                return _scalar, (obj.dtype.str, obj.tobytes())
            return _ndarray, (obj.dtype.str, obj.shape, obj.tobytes())
        if isinstance(obj, dict) and kind is not dict and not (kind.__flags__ & (1 << 9)):  # C-defined subclasses
            return dict, (dict(obj),)
        return NotImplemented


def dumps(value: Any, classes: Mapping[str, type]) -> bytes:
    buf = io.BytesIO()
    Sender(buf, classes).dump(value)
    return buf.getvalue()


class Receiver(pickle.Unpickler):
    """Loads what `Sender` writes, and nothing that can run code: no class or function but those listed above;
    instances only of `classes` (the receiving side's own)."""

    def __init__(self, data: bytes, classes: Mapping[str, type]):
        super().__init__(io.BytesIO(data))
        self._classes = classes

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if module == __name__ and name == "_instance":
            return self._new
        if module == __name__ and name in ("_ndarray", "_scalar"):
            return globals()[name]
        raise pickle.UnpicklingError(f"the program's process sent {module}.{name}: a result must be plain data, "
                                     "numbers, numpy arrays or instances of the prelude's classes")

    def _new(self, name: str) -> Any:
        cls = self._classes.get(name)
        if cls is None:
            raise pickle.UnpicklingError(f"the program's process sent an instance of {name!r}, not a class of the "
                                         "prelude")
        return cls.__new__(cls)


def loads(data: bytes, classes: Mapping[str, type]) -> Any:
    return Receiver(data, classes).load()
