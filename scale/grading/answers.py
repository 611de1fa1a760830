"""Answer extraction (``\\boxed{}``, "the answer is", the last number) and the exact fast path's
normalisation (:func:`parse_number`, :func:`normalize_answer`); see :mod:`scale.grading`."""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces balanced), else None.

    >>> extract_boxed(r"so $x = \boxed{\frac{1}{2}}$, and \boxed{")
    '\\frac{1}{2}'
    """
    if not isinstance(text, str):
        return None
    opens = {m.end() - 1 for m in _BOX_RE.finditer(text)}  # positions of the "{" that open a box
    if not opens:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    i, n = 0, len(text)
    while i < n:  # one pass, so a long completion full of unclosed boxes stays linear
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # escaped brace \{ \} (a set) does not count
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            start = stack.pop()
            if start in opens and (best is None or start > best[0]):
                best = (start, i)
        i += 1
    return None if best is None else text[best[0] + 1 : best[1]]


_ANSWER_IS_RE = re.compile(r"(?:answer\s*(?:is|:|=)|####)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_answer(text: str | None) -> str | None:
    r"""The final answer in a completion (the order of the rules is in the module docstring).

    >>> extract_answer(r"... so the total is \boxed{ 7 }."), extract_answer("The answer is 42 apples.")
    (' 7 ', '42 apples')
    >>> extract_answer("3 + 4 = 7, minus 1 is 6"), extract_answer("I do not know")
    ('6', None)
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(matches):
        tail = re.split(r"\.(?:\s|$)", m.group(1), maxsplit=1)[0].strip().strip("$").strip()
        if tail:
            return tail
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_REMOVE = (
    r"\left",
    r"\right",
    r"\!",
    r"\,",
    r"\;",
    r"\:",
    r"\displaystyle",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "\\degree",
    "°",
    "\\%",
    "%",
    "\\$",
    "$",
)
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_FULL = re.compile(
    rf"^(?P<sign>[-+]?)\s*(?:"
    rf"\\frac\s*\{{\s*(?P<fn>-?(?:{_NUM}))\s*\}}\s*\{{\s*(?P<fd>{_NUM})\s*\}}"  # \frac{a}{b}
    rf"|\\frac(?P<sn>\d)(?P<sd>\d)"  # \frac12
    rf"|(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?"  # a, a/b
    rf")(?:\s+[A-Za-z][A-Za-z\s.]*)?$"  # trailing unit words
)


def _clean(s: str) -> str:
    s = s.strip()
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("−", "-"), ("\\ ", " ")):
        s = s.replace(old, new)
    prev = None
    while prev != s:  # \text{...} -> " ... " (innermost first)
        prev, s = s, _TEXT_CMD_RE.sub(r" \1 ", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "").replace("~", " ")
    s = " ".join(s.split()).strip().rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)  # "x = 5" -> "5"
    return s


def _to_fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def parse_number(answer: str | None) -> Fraction | None:
    r"""The exact number an answer string denotes, or None if it is not a plain number.

    Handles integers, decimals, ``a/b``, ``\frac{a}{b}``, signs, thousands separators, ``$``, ``%``,
    degrees, ``\text{}`` and trailing unit words (see the module docstring).

    >>> [parse_number(s) for s in [r"\frac{1}{2}", "1,234", r"90^\circ", r"\$5", "5 dollars", "x+1"]]
    [Fraction(1, 2), Fraction(1234, 1), Fraction(90, 1), Fraction(5, 1), Fraction(5, 1), None]
    """
    if not isinstance(answer, str):
        return None
    s = _clean(answer)
    if len(s) > 100:
        return None
    m = _NUMBER_FULL.match(s)
    if m is None:
        return None
    try:
        if m.group("fn") is not None:
            num, den = _to_fraction(m.group("fn")), _to_fraction(m.group("fd"))
        elif m.group("sn") is not None:
            num, den = Fraction(int(m.group("sn"))), Fraction(int(m.group("sd")))
        else:
            num = _to_fraction(m.group("a"))
            den = _to_fraction(m.group("b")) if m.group("b") else Fraction(1)
        if den == 0:
            return None
        value = num / den
    except (ValueError, ZeroDivisionError):
        return None
    return -value if m.group("sign") == "-" else value


def normalize_answer(answer: str | None) -> str | None:
    r"""Canonical form of an answer, used for exact matching and majority voting.

    Numbers become their exact reduced form (``"0.5"``, ``"1/2"`` and ``"\frac{1}{2}"`` all give
    ``"1/2"``; ``"1,234"`` gives ``"1234"``); anything else is :func:`_clean`-ed with all whitespace
    removed. ``None`` or an empty answer gives ``None``.

    >>> [normalize_answer(s) for s in ["0.5", r"\frac{1}{2}", " 42 apples", r"x^2 + 1", "  "]]
    ['1/2', '1/2', '42', 'x^2+1', None]
    """
    if not isinstance(answer, str):
        return None
    value = parse_number(answer)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    s = "".join(_clean(answer).split())
    return s or None
