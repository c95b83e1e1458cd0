"""Final-answer extraction from a completion, and light normalisation of the extracted string.

    extract_answer(text, "boxed")        # last complete \\boxed{...} / \\fbox{...} / \\boxed 5
    extract_answer(text, "hash")         # GSM8K style: the rest of the line after the last '####'
    extract_answer(text, "answer_tag")   # last <answer>...</answer>
    extract_answer(text, "answer_is")    # last "The (final) answer is X" / "Final answer: X" / "X is the answer"
    extract_answer(text, "last_line")    # last non-empty line
    extract_answer(text, "auto")         # boxed, then answer_tag, then hash, then answer_is
    extract_answer(text, r"Result: (\\d+)")  # any other string: a regex, group 1 of its last match
    after_thinking(text, prompt)         # a reasoning model's final answer: the text after its last </think>

Every extractor returns the stripped answer of the last non-empty match, or None when there is none: an empty
`\\boxed{}` (often the prompt's instruction repeated) or `<answer></answer>` is passed over.
`normalize_answer` only undoes what is safe to undo (thousands separators, a sentence's final period, a
currency sign, enclosing $...$); units and words are left for math-verify, which knows more about them, except
that against a gold that is a plain number, a number followed only by words ("18 cookies") is that number
(`number_before_words`).
The environments extract from `after_thinking`'s text (their `strip_thinking` option), so that an answer written
while reasoning is not taken for the final one, and a completion cut off mid-reasoning has none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_BOX_COMMANDS = ("\\boxed", "\\fbox")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# A lookahead, so that matches overlap: in "Answer: I think the answer is 18." the last one is "the answer is 18".
_ANSWER_IS = re.compile(r"(?=(?:final answer|answer) is\s*:?\s*(.+?)\s*(?:\.(?=\s|$)|\n|$))", re.IGNORECASE)
# "answer: X" as a heading (at a line's start, after a list marker: "Answer: 18", "**Final Answer:** 18", "2. Answer:
# 7", "Step 3: Answer: 7"), a sentence's start ("9 * 2 = 18. Answer: 18", on one line) or "the/my/our/so/thus/hence/
# therefore (the) (final/correct) answer:", "final/correct answer:"; not any "... answer:" ("The answer is 18.\nCheck
# answer: yes" states 18, not "yes").
_ANSWER_COLON = re.compile(r"(?=(?:^[ \t#>*_-]*(?:(?:\d+|[a-z])[.)][ \t]+|\(\w+\)[ \t]*"
                           r"|step[ \t]*\d+[ \t]*[:.)-][ \t]*)?"
                           r"|(?<=[.!?])[ \t]+[*_]*"
                           r"|\b(?:the|my|our|so|thus|hence|therefore)\b[ \t,]+(?:the[ \t]+)?"
                           r"|\b(?=(?:final|correct)\s))"
                           r"(?:(?:final|correct)\s+)?answer\s*:\s*(.+?)\s*(?:\.(?=\s|$)|\n|$))",
                           re.IGNORECASE | re.MULTILINE)
# The statement the other way round, as small instruct models write it: "So, 18 is the answer." / "2475 is the final
# answer" / "to get 2, which is the answer"; a number only ("This is the answer to the question." states none).
_NUMBER_IS_ANSWER = re.compile(r"(?<![\w.,$])(\$?[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:,?\s+which)?\s+is\s+"
                               r"(?:the|my|our)\s+(?:final\s+|correct\s+)?answer(?![\w'])", re.IGNORECASE)
# "The final answer to the arithmetic problem is 9.": "answer to <words> is X" (no digit or sentence end between).
_ANSWER_TO_IS = re.compile(r"(?=(?:final answer|answer) to [^\d\n.]{1,60}? is\s*:?\s*(.+?)\s*(?:\.(?=\s|$)|\n|$))",
                           re.IGNORECASE)
# The \boxed{} instruction repeated ("The answer is within \boxed{}.", "Your final answer is within the specified
# ... explanation"): where the answer goes, not an answer.
_ECHOED_INSTRUCTION = re.compile(r"within\b|.*\\boxed\s*\{\s*\}", re.IGNORECASE | re.DOTALL)
# Markdown emphasis around the statement ("**The answer is 18.**", "**Final Answer:** 18"): a run of '*' or '__' that
# opens (at a line's start or after a space, before a non-space) or closes (after a non-space, before a space,
# punctuation or the end). "2**10", "2 * 3" and "z^*" keep theirs.
_EMPHASIS_DELIMITER = re.compile(r"(?<![^\s(])(?:\*{1,3}|_{2,3})(?=[^\s*_])"
                                 r"|(?<=[^\s*_^\\])(?:\*{1,3}|_{2,3})(?=[\s.,;:!?)]|$)")
# ", since 9 + 9 = 18" after a one-piece answer that has a digit or a math sign (a number, an expression, an
# equation); lowercase words only, and never after a list (comma-separated words are an answer of their own).
_REASON_CLAUSE = re.compile(r",\s+(?:since|because|as|which|so|given|from|by|due)\b")
_MATHY = re.compile(r"[\d$\\^=+*/()<>-]")


def after_thinking(completion: str, prompt: str = "") -> str | None:
    """The part of a reasoning model's completion that holds its final answer (Qwen3, DeepSeek-R1 and its
    distills write `<think>reasoning</think>answer`): the text after the last </think>; None when the completion
    ends inside a think block, which it opened (or its prompt opened: a generation prompt ending in "<think>\\n")
    and never closed, i.e. it was cut off mid-reasoning and has no final answer yet; the completion unchanged
    when it has no think tags and its prompt does not open one."""
    opened, closed = completion.rfind(THINK_OPEN), completion.rfind(THINK_CLOSE)
    if opened > closed:
        return None
    if closed >= 0:
        return completion[closed + len(THINK_CLOSE):]
    return None if prompt.rstrip().endswith(THINK_OPEN) else completion


def final_texts(prompts: list[str], completions: list[str], strip_thinking: bool) -> list[str]:
    """Each completion's text to extract the answer from: `after_thinking`'s ("" for one cut off mid-reasoning, in
    which no extractor finds anything) when `strip_thinking`, else the completion."""
    if not strip_thinking:
        return list(completions)
    return [after_thinking(c, p) or "" for p, c in zip(prompts, completions, strict=True)]


def _balanced_group(text: str, start: int) -> tuple[str, int] | None:
    """text[start] == '{': (content, index after the closing brace), or None if it never closes.
    Escaped braces (\\{ and \\}) do not count."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def _box_argument(text: str, end: int) -> str | None:
    """The argument of a box command ending at `end`: a balanced {group} or, as in `\\boxed 5`, the token after
    whitespace. None if there is none (or the command is a longer name like \\boxedfoo)."""
    if end < len(text) and text[end] == "{":
        group = _balanced_group(text, end)
        return None if group is None else group[0]
    if end >= len(text) or not text[end].isspace():
        return None
    rest = text[end:].lstrip()
    if rest.startswith("{"):
        group = _balanced_group(rest, 0)
        return None if group is None else group[0]
    token = re.match(r"[^\s$]+", rest)
    return token.group(0) if token else None


def _last_nonempty(values: Iterable[str | None]) -> str | None:
    out = None
    for v in values:
        if v is not None and v.strip():
            out = v.strip()
    return out


def extract_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} or \\fbox{...} (nested braces allowed; `\\boxed 5` too).
    An unclosed (truncated) or empty box is skipped in favour of the one before it."""
    starts = sorted((m.start(), m.end()) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text))
    for _, end in reversed(starts):
        arg = _box_argument(text, end)
        if arg is not None and arg.strip():
            return arg.strip()
    return None


def extract_hash(text: str) -> str | None:
    """GSM8K's final answer: the rest of the line after the last '####'."""
    return _last_nonempty(m.group(1) for m in _HASH.finditer(text))


def extract_answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer> (an unclosed tag before it is ignored)."""
    return _last_nonempty(m.group(1) for m in _ANSWER_TAG.finditer(text))


def last_answer_tag_is_empty(text: str) -> bool:
    """Whether the last complete <answer>...</answer> holds only whitespace: an empty answer given on purpose
    (some tasks' gold is the empty string), which the extractors pass over."""
    last = None
    for m in _ANSWER_TAG.finditer(text):
        last = m
    return last is not None and not last.group(1).strip()


def extract_answer_is(text: str) -> str | None:
    """X of the last "The answer is X" / "the final answer is: X" / "Final answer: X" / "The answer to the problem is
    X" / "X is the answer" (X a number), up to the end of its sentence or line, or up to a clause that gives the
    reason ("18, since 9 + 9 = 18" -> 18). Markdown emphasis is read through ("**The answer is 18.**" -> 18). The
    \\boxed{} instruction repeated ("The answer is within \\boxed{}.") is passed over."""
    text = _EMPHASIS_DELIMITER.sub("", text)
    found = sorted((m.start(), m.group(1)) for rx in (_ANSWER_IS, _ANSWER_COLON, _ANSWER_TO_IS, _NUMBER_IS_ANSWER)
                   for m in rx.finditer(text))
    return _last_nonempty(None if _ECHOED_INSTRUCTION.match(v) else _without_reason(v) for _, v in found)


def _without_reason(answer: str) -> str:
    m = _REASON_CLAUSE.search(answer)
    if m is None:
        return answer
    head = answer[:m.start()]
    return head if "," not in head and _MATHY.search(head) else answer


def extract_last_line(text: str) -> str | None:
    """The last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def extract_regex(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """Group 1 (the whole match if the pattern has no group) of the last match of `pattern`."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return _last_nonempty(m.group(1) if rx.groups else m.group(0) for m in rx.finditer(text))


def extract_auto(text: str) -> str | None:
    """The first format found, in the order boxed, answer_tag, hash, answer_is."""
    for fn in (extract_boxed, extract_answer_tag, extract_hash, extract_answer_is):
        value = fn(text)
        if value is not None:
            return value
    return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "hash": extract_hash,
    "answer_tag": extract_answer_tag,
    "answer_is": extract_answer_is,
    "last_line": extract_last_line,
    "auto": extract_auto,
}


def check_answer_format(answer_format: str) -> None:
    """ValueError unless `answer_format` names an extractor or is a regex with a capture group."""
    if not isinstance(answer_format, str):
        raise ValueError(f"answer_format must be a string, got {type(answer_format).__name__}")
    if answer_format in EXTRACTORS:
        return
    try:
        groups = re.compile(answer_format).groups
    except re.error as e:
        raise ValueError(f"answer_format {answer_format!r} is neither one of {sorted(EXTRACTORS)} nor a valid "
                         f"regex ({e})") from e
    if groups < 1:
        raise ValueError(f"answer_format {answer_format!r} is neither one of {sorted(EXTRACTORS)} nor a regex with "
                         "a capture group (group 1 is the answer)")


def extract_answer(text: str, answer_format: str = "auto") -> str | None:
    """The answer in `text` per `answer_format` (a name in EXTRACTORS, or a regex whose group 1 is the answer)."""
    fn = EXTRACTORS.get(answer_format)
    if fn is not None:
        return fn(text)
    check_answer_format(answer_format)
    return extract_regex(text, answer_format)


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_THOUSANDS_SEPARATORS = ("{,}", "\\,", "\\!", "\\ ", "~", " ", "\u00a0", "\u202f", "\u2009")
_EMPHASIS = re.compile(r"(\*\*|__|\*)(?=\S)(.+?)(?<=\S)\1", re.DOTALL)


def _unwrap(s: str) -> str:
    """Strip whitespace and enclosing $...$, \\(...\\), \\[...\\] and markdown emphasis (**18**, __18__, *18*),
    repeatedly."""
    while True:
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and s.count("$") in (2, 4):
            s = s.strip("$")
        elif m := _EMPHASIS.fullmatch(s):
            s = m.group(2)
        elif s.startswith(("\\(", "\\[")) and s.endswith(("\\)", "\\]")):
            s = s[2:-2]
        else:
            return s


def normalize_number(s: str) -> str | None:
    """The plain decimal form of a string that is one number, or None if it is anything else.

    Undoes only formatting: whitespace, enclosing $...$, a currency sign ($ or \\$) before the number, a sentence's
    final period ("42."), well-formed thousands separators ("1,000", "1{,}000", "1\\,000", "1 000"), a leading '+', and
    leading and trailing zeros ("18.00" and "018" are "18", "0.50" is "0.5"), so that equal numbers compare equal
    as text (majority votes, exact matches).
    "1,00" or "1,2,3" (not thousands groups), "5 cm", "10%", "1/2" are not plain numbers: None.
    """
    s = _unwrap(s)
    sign = ""
    if s.startswith(("+", "-")):
        sign, s = ("-" if s[0] == "-" else ""), s[1:].lstrip()
    for currency in ("\\$", "$"):
        if s.startswith(currency):
            s = s[len(currency):].lstrip()
            break
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    for sep in _THOUSANDS_SEPARATORS:
        if sep in s:
            candidate = s.replace(sep, ",")
            if _GROUPED.fullmatch(candidate):
                s = candidate
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    whole, _, frac = s.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    s = f"{whole}.{frac}" if frac else whole
    return sign + s if s != "0" else s  # no "-0"


# A number, a space, then only words: "18 dollars", "18 \\text{ cookies}", "$18 per hour". After a space ("2xy" is
# a product), and none that make the number another number or a formula: magnitudes
# ("3 thousand"), fractions ("2 thirds"), powers and operators ("5 squared", "4 factorial"), comparisons ("3 at
# most"), functions and constants.
_NUMBER_THEN_WORDS = re.compile(r"(.*?\d\.?)(?:\s*\\(?:text|mbox|mathrm)\s*\{\s*([A-Za-z][A-Za-z \-']*?)\s*\}"
                                r"|\s+([A-Za-z][A-Za-z \-']*?))\s*\.?", re.DOTALL)
_NOT_UNITS = set("""
    hundred hundreds thousand thousands million millions billion billions trillion trillions dozen dozens score
    k m b bn mn lakh lakhs crore crores grand ten tens half halves third thirds quarter quarters fourth fourths
    fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths eleventh elevenths twelfth
    twelfths hundredth hundredths thousandth thousandths millionth millionths billionth billionths through thru
    squared cubed square cube root roots power powers factorial choose over plus minus divided by
    multiplied and or to of at most least more less than under above below about approximately around nearly
    almost exactly only not no than fewer greater smaller pi sqrt mod log ln exp sin cos tan sec csc cot arcsin
    arccos arctan sinh cosh tanh inf infinity infty i e cdot div frac dx dy percent percentage
    with remainder remainders r wrong incorrect false true if but except unless when where because since maybe
    perhaps possibly probably either neither nor
""".split())
# Words of one or two letters are variables ("6 xy") unless they are one of these unit abbreviations.
_SHORT_UNITS = set("cm mm km nm kg mg ml cl dl ft in yd mi oz lb hr ms ns am pm kb mb gb tb mw kw".split())

def number_before_words(s: str) -> str | None:
    """The plain number of an answer that is one number followed only by words (a unit: "18 dollars",
    "18 \\text{ cookies}"), else None. For comparing with a gold that is a plain number; math-verify knows some
    units only, and scored "18 cookies" against 18 as wrong."""
    m = _NUMBER_THEN_WORDS.fullmatch(_unwrap(s))
    if not m:
        return None
    words = (m.group(2) or m.group(3) or "").lower().replace("-", " ").split()
    if not words or any(w in _NOT_UNITS or (len(w) < 3 and w not in _SHORT_UNITS) for w in words):
        return None
    return normalize_number(m.group(1))


def normalize_answer(s: str) -> str:
    """The plain number if `s` is one (see normalize_number), else `s` stripped, without enclosing $...$ and
    without a sentence's final period after a word or closing bracket. Never drops units or words."""
    number = normalize_number(s)
    if number is not None:
        return number
    s = _unwrap(s)
    if len(s) > 1 and s.endswith(".") and not s.endswith("..") and (s[-2].isalnum() or s[-2] in ")]}"):
        s = s[:-1].rstrip()
    return s
