"""Plain-text math as CHAMP writes its answers ("sum_(k=1)^n 1/k", "C(n+1, 2m+1)", "2^floor(n/2)") rewritten as
LaTeX, which math-verify parses: its LaTeX reader takes "sum_(k=1)^n 1/k" for the number 1 and "C(n, 4)" for a
product, so a gold left in this notation rewards wrong answers and rejects right ones."""

from __future__ import annotations

import re

_FUNCTION = re.compile(r"(sqrt|floor|C)\(")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[A-Za-z0-9]+")  # an exponent written without brackets: x^1.5, 2^n
_SYMBOLS = {"±": "\\pm ", "≥": "\\geq ", "≤": "\\leq ", "−": "-", "*": " \\cdot "}


def _group(s: str, i: int) -> tuple[str, int]:
    """s[i] == '(': (the text inside it and its matching ')', the index after that ')')."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
    raise ValueError(f"unbalanced parentheses in {s!r}")


def _top_level_split(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(s):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    return parts + [s[start:]]


def _function(s: str, i: int) -> tuple[str, int] | None:
    """A sqrt(..), floor(..) or C(a, b) call starting at s[i] (not inside a longer name) as LaTeX, and the index
    after it; None when there is none."""
    m = _FUNCTION.match(s, i)
    if not m or (i and s[i - 1].isalnum()):
        return None
    inner, end = _group(s, m.end() - 1)
    name = m.group(1)
    if name == "sqrt":
        return "\\sqrt{" + ascii_math_to_latex(inner) + "}", end
    if name == "floor":
        return "\\lfloor " + ascii_math_to_latex(inner) + " \\rfloor", end
    args = _top_level_split(inner)
    if len(args) != 2:
        return None
    return "\\binom{" + ascii_math_to_latex(args[0].strip()) + "}{" + ascii_math_to_latex(args[1].strip()) + "}", end


def ascii_math_to_latex(s: str) -> str:
    """LaTeX for plain-text math: sqrt(x) -> \\sqrt{x}, floor(x) -> \\lfloor x \\rfloor, C(n, k) -> \\binom{n}{k},
    sum_(i=1)^n -> \\sum_{i=1}^{n}, an exponent's group or token braced (2^(n-1) -> 2^{n-1}), * -> \\cdot, and ±, ≥,
    ≤ and the minus sign as LaTeX. Anything else is kept as written."""
    out, i = [], 0
    while i < len(s):
        call = _function(s, i)
        if call:
            out.append(call[0])
            i = call[1]
        elif s.startswith("sum_(", i):
            inner, i = _group(s, i + 4)
            out.append("\\sum_{" + ascii_math_to_latex(inner) + "}")
        elif s[i] == "^" and i + 1 < len(s):
            call = _function(s, i + 1)
            if call:
                out.append("^{" + call[0] + "}")
                i = call[1]
            elif s[i + 1] == "(":
                inner, i = _group(s, i + 1)
                out.append("^{" + ascii_math_to_latex(inner) + "}")
            elif tok := _TOKEN.match(s, i + 1):
                out.append("^{" + tok.group(0) + "}")
                i = tok.end()
            else:
                out.append("^")
                i += 1
        else:
            out.append(_SYMBOLS.get(s[i], s[i]))
            i += 1
    return "".join(out)
