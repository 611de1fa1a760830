r"""Answer checkers of the generated tasks: the safe arithmetic evaluator, countdown, sorting.

:func:`evaluate_arithmetic` is a small recursive-descent parser over numbers, ``+ - * /`` (also ``×``,
``÷``, ``\times``, ``\cdot``, ``\div``), parentheses and ``\frac{..}{..}``; anything else is rejected.
Model output is never passed to ``eval``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction


class ExpressionError(ValueError):
    """An expression that the safe arithmetic parser rejects (syntax, size, division by zero)."""


_LATEX_REPLACEMENTS = (
    (r"\left", ""),
    (r"\right", ""),
    (r"\times", "*"),
    (r"\cdot", "*"),
    (r"\div", "/"),
    (r"\dfrac", r"\frac"),
    (r"\tfrac", r"\frac"),
    (r"\!", ""),
    (r"\,", ""),
    (r"\;", ""),
    (r"\ ", " "),
    ("×", "*"),
    ("·", "*"),
    ("÷", "/"),
    ("−", "-"),
    ("–", "-"),
)
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<frac>\\frac)|(?P<op>[-+*/()\[\]{}]))")


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].lstrip()[:20]
            raise ExpressionError(f"unexpected input at character {pos + 1}: {bad!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent: ``expr := term (('+'|'-') term)*``, ``term := unary (('*'|'/') unary)*``,
    ``unary := '-' unary | atom``, ``atom := number | '(' expr ')' | '[' expr ']' | '{' expr '}' |
    '\\frac' '{' expr '}' '{' expr '}'``."""

    _CLOSE = {"(": ")", "[": "]", "{": "}"}

    def __init__(self, tokens, *, allow_decimals: bool, allow_unary: bool, max_depth: int):
        self.tokens, self.i = tokens, 0
        self.allow_decimals, self.allow_unary, self.max_depth = allow_decimals, allow_unary, max_depth
        self.literals: list[Fraction] = []

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None):
        kind, tok = self.peek()
        if kind is None:
            raise ExpressionError("unexpected end of expression")
        if value is not None and tok != value:
            raise ExpressionError(f"expected {value!r}, got {tok!r}")
        self.i += 1
        return kind, tok

    def expr(self, depth: int) -> Fraction:
        if depth > self.max_depth:
            raise ExpressionError(f"expression nested deeper than {self.max_depth}")
        value = self.term(depth)
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            rhs = self.unary(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / rhs
        return value

    def unary(self, depth: int) -> Fraction:
        if self.peek()[1] == "-":
            if not self.allow_unary:
                raise ExpressionError("unary minus is not allowed")
            self.take()
            return -self.unary(depth + 1)
        return self.atom(depth)

    def atom(self, depth: int) -> Fraction:
        kind, tok = self.take()
        if kind == "num":
            if "." in tok and not self.allow_decimals:
                raise ExpressionError(f"decimal number {tok!r} is not allowed")
            value = Fraction(tok)
            self.literals.append(value)
            return value
        if kind == "frac":
            num = self.group(depth, "{")
            den = self.group(depth, "{")
            if den == 0:
                raise ExpressionError("division by zero")
            return num / den
        if tok in self._CLOSE:
            self.i -= 1
            return self.group(depth, tok)
        raise ExpressionError(f"unexpected {tok!r}")

    def group(self, depth: int, open_: str) -> Fraction:
        self.take(open_)
        value = self.expr(depth + 1)
        self.take(self._CLOSE[open_])
        return value


def evaluate_arithmetic(
    text: str,
    *,
    allow_decimals: bool = True,
    allow_unary: bool = True,
    max_length: int = 1000,
    max_depth: int = 50,
) -> tuple[Fraction, list[Fraction]]:
    r"""Exactly evaluate an arithmetic expression without ``eval``; return ``(value, literals)``.

    Accepts non-negative number literals (decimals unless ``allow_decimals=False``), ``+ - * /`` with
    the usual precedence, unary minus (unless ``allow_unary=False``), ``()``, ``[]``, ``{}`` and
    ``\frac{a}{b}``, plus the spellings ``×``, ``÷``, ``·``, ``−``, ``\times``, ``\cdot``, ``\div``,
    ``\left``/``\right``. ``literals`` lists the number literals in order of appearance. Anything else
    (names, calls, ``**``, implicit multiplication, over ``max_length`` characters or ``max_depth``
    nesting, division by zero) raises :class:`ExpressionError` (a ``ValueError``).

    >>> evaluate_arithmetic("(25 - 5) \\times 4 / 3")
    (Fraction(80, 3), [Fraction(25, 1), Fraction(5, 1), Fraction(4, 1), Fraction(3, 1)])
    >>> evaluate_arithmetic("__import__('os')")
    Traceback (most recent call last):
    ...
    scale.tasks.checkers.ExpressionError: unexpected input at character 1: "__import__('os')"
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string, got {type(text).__name__}")
    if len(text) > max_length:
        raise ExpressionError(f"expression longer than {max_length} characters")
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, allow_decimals=allow_decimals, allow_unary=allow_unary, max_depth=max_depth)
    value = parser.expr(0)
    if parser.i != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.i][1]!r} after a complete expression")
    return value, parser.literals


def format_fraction(x: Fraction | int) -> str:
    """``Fraction(7, 3)`` -> ``"7/3"``, ``Fraction(-4, 1)`` -> ``"-4"`` (the reference-answer form)."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def check_countdown(
    expression: str | None, numbers: Sequence[int], target: int, *, use_all: bool = False
) -> bool:
    r"""Whether ``expression`` reaches ``target`` using each of ``numbers`` at most once.

    The expression is evaluated exactly by :func:`evaluate_arithmetic` (integer literals only, ``+ - *
    /``, parentheses; division is exact, so ``7 / 2`` is 7/2). An optional trailing ``= <target>``
    is allowed (``"(25 - 5) * 4 = 80"``); any other ``=`` makes it wrong. The multiset of literals must
    be contained in ``numbers`` (equal to it with ``use_all=True``). Unparsable input is wrong, never
    an error.

    >>> check_countdown("(25 - 5) * 4", [4, 5, 25, 7], 80)
    True
    >>> check_countdown("25 * 4 - 5 - 5", [4, 5, 25, 7], 90)    # 5 used twice
    False
    """
    if not isinstance(expression, str) or not expression.strip():
        return False
    lhs, eq, rhs = expression.partition("=")
    if eq:
        try:
            rhs_value, rhs_literals = evaluate_arithmetic(rhs, allow_decimals=False)
        except ExpressionError:
            return False
        if len(rhs_literals) != 1 or rhs_value != target:
            return False
    try:
        value, literals = evaluate_arithmetic(lhs, allow_decimals=False)
    except ExpressionError:
        return False
    used, given = Counter(literals), Counter(Fraction(n) for n in numbers)
    if use_all and used != given:
        return False
    if any(used[v] > given[v] for v in used):
        return False
    return value == target


_LIST_ITEM = re.compile(r"^[-−]?\d+$")


def _parse_int_list(text: str) -> list[int] | None:
    text = text.strip().strip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\{", ""), ("\\}", ""), ("−", "-"), ("$", "")):
        text = text.replace(old, new)
    text = text.strip().strip("[](){}").strip()
    if not text:
        return None
    parts = [p.strip() for p in (text.split(",") if "," in text else text.split())]
    if not all(_LIST_ITEM.match(p) for p in parts):
        return None
    return [int(p.replace("−", "-")) for p in parts]


def check_sorted(answer: str | None, reference: str) -> bool:
    """Whether ``answer`` is the list ``reference`` (``"1, 3, 7"``): same integers in the same order.

    The answer may be written ``1, 3, 7``, ``[1, 3, 7]``, ``(1,3,7)`` or ``1 3 7``.

    >>> check_sorted("[1, 3, 7]", "1, 3, 7"), check_sorted("1, 7, 3", "1, 3, 7")
    (True, False)
    """
    if not isinstance(answer, str):
        return False
    got, want = _parse_int_list(answer), _parse_int_list(reference)
    return got is not None and got == want
