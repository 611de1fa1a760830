"""Generated tasks (``arithmetic``, ``countdown``, ``sorting``): configs, seeded draws, disjoint splits."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .checkers import check_countdown, evaluate_arithmetic, format_fraction
from .problems import Problem, Task


def _require(cond: bool, where: str, message: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{where} {message}, got {value!r}")


@dataclass(frozen=True)
class _GeneratedConfig:
    n_train: int = 1000
    n_eval: int = 200
    eval_frac: float = 0.2

    def validate(self, name: str) -> None:
        _require(self.n_train >= 0, f"{name}.n_train", "must be >= 0", self.n_train)
        _require(self.n_eval >= 0, f"{name}.n_eval", "must be >= 0", self.n_eval)
        _require(0.0 < self.eval_frac < 1.0, f"{name}.eval_frac", "must lie in (0, 1)", self.eval_frac)


@dataclass(frozen=True)
class ArithmeticConfig(_GeneratedConfig):
    """``arithmetic``: ``ops`` operators over ``ops + 1`` operands of exactly ``digits`` digits."""

    digits: int = 2
    ops: int = 2
    operators: str = "+-*"

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(1 <= self.digits <= 12, f"{name}.digits", "must lie in [1, 12]", self.digits)
        _require(1 <= self.ops <= 20, f"{name}.ops", "must lie in [1, 20]", self.ops)
        ops = self.operators
        _require(
            bool(ops) and set(ops) <= set("+-*/") and len(set(ops)) == len(ops),
            f"{name}.operators",
            "must be distinct characters from '+-*/'",
            ops,
        )


@dataclass(frozen=True)
class CountdownConfig(_GeneratedConfig):
    """``countdown``: ``numbers`` integers in ``[1, max_value]``, target in ``[1, max_target]``."""

    numbers: int = 4
    max_value: int = 25
    max_target: int = 100
    use_all: bool = False

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(2 <= self.numbers <= 8, f"{name}.numbers", "must lie in [2, 8]", self.numbers)
        _require(2 <= self.max_value <= 10_000, f"{name}.max_value", "must lie in [2, 10000]", self.max_value)
        _require(self.max_target >= 2, f"{name}.max_target", "must be >= 2", self.max_target)


@dataclass(frozen=True)
class SortingConfig(_GeneratedConfig):
    """``sorting``: ``length`` integers in ``[min_value, max_value]``, sorted ``asc`` or ``desc``."""

    length: int = 5
    min_value: int = 0
    max_value: int = 99
    order: str = "asc"

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(2 <= self.length <= 50, f"{name}.length", "must lie in [2, 50]", self.length)
        _require(
            self.min_value < self.max_value, f"{name}.max_value", "must exceed min_value", self.max_value
        )
        _require(self.order in ("asc", "desc"), f"{name}.order", "must be asc or desc", self.order)


def _hash01(*parts: Any) -> float:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


def _rng(*parts: Any) -> random.Random:
    return random.Random(int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def _draw_split(name: str, seed: int, split: str, n: int, eval_frac: float, draw) -> list[Problem]:
    """Draw ``n`` distinct problems whose hash bucket is ``split``; ``draw(rng) -> (key, Problem)``."""
    rng = _rng(name, seed, split)
    want_eval = split == "eval"
    seen: set[str] = set()
    out: list[Problem] = []
    stall, max_stall = 0, 10_000 + 10 * n  # draws since the last new problem
    while len(out) < n:
        if stall > max_stall:
            raise ValueError(
                f"{name}: found only {len(out)} distinct {split} problems ({max_stall} draws in a row gave "
                f"nothing new); n_{split}={n} is too many for this problem space (lower n_{split} or "
                f"widen the task)"
            )
        key, problem = draw(rng)
        if key in seen or (_hash01(name, key) < eval_frac) != want_eval:
            stall += 1
            continue
        stall = 0
        seen.add(key)
        out.append(dataclasses.replace(problem, id=f"{name}/{hashlib.sha256(key.encode()).hexdigest()[:12]}"))
    return out


def _operand(rng: random.Random, digits: int, nonzero: bool) -> int:
    lo = 10 ** (digits - 1) if digits > 1 else (1 if nonzero else 0)
    return rng.randint(lo, 10**digits - 1)


def _arithmetic_draw(cfg: ArithmeticConfig):
    def draw(rng: random.Random):
        ops = [rng.choice(cfg.operators) for _ in range(cfg.ops)]
        operands = [_operand(rng, cfg.digits, nonzero=False)]
        operands += [_operand(rng, cfg.digits, nonzero=op == "/") for op in ops]
        expr = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:], strict=True))
        value, _ = evaluate_arithmetic(expr)
        prompt = f"What is {expr}?"
        if "/" in cfg.operators:
            prompt += " Give the exact value (a reduced fraction if it is not an integer)."
        meta = {"expression": expr, "operands": operands, "operators": ops}
        return expr, Problem(prompt, format_fraction(value), task="arithmetic", meta=meta)

    return draw


_COUNTDOWN_OPS = ("+", "-", "*", "/")


def _combine(a, b, op: str):
    """Combine pool items ``(value, text, prec)`` (prec 3 = number, 2 = product, 1 = sum) with ``op``."""
    (va, ta, pa), (vb, tb, pb) = a, b
    left_parens = pa == 1 and op in ("*", "/")
    right_parens = (pb == 1 and op in ("-", "*")) or (pb <= 2 and op == "/")
    ta = f"({ta})" if left_parens else ta
    tb = f"({tb})" if right_parens else tb
    if op == "+":
        value = va + vb
    elif op == "-":
        value = va - vb
    elif op == "*":
        value = va * vb
    else:
        value = va / vb
    return value, f"{ta} {op} {tb}", 1 if op in ("+", "-") else 2


def _countdown_draw(cfg: CountdownConfig):
    def draw(rng: random.Random):
        while True:
            numbers = [rng.randint(1, cfg.max_value) for _ in range(cfg.numbers)]
            k = cfg.numbers if cfg.use_all else rng.randint(2, cfg.numbers)
            pool = [(Fraction(x), str(x), 3) for x in rng.sample(numbers, k)]
            while len(pool) > 1:  # combine two random items until one expression is left
                i, j = rng.sample(range(len(pool)), 2)
                a, b = pool[i], pool[j]
                op = rng.choice(_COUNTDOWN_OPS)
                if op == "-" and a[0] < b[0]:
                    a, b = b, a
                if op == "-" and a[0] == b[0]:
                    op = "+"
                if op == "/" and (b[0] in (0, 1) or (a[0] / b[0]).denominator != 1):
                    op = "+"
                if op == "*" and 1 in (a[0], b[0]):
                    op = "+"
                pool = [p for t, p in enumerate(pool) if t not in (i, j)] + [_combine(a, b, op)]
            target, solution, _ = pool[0]
            if target.denominator != 1 or not 1 <= target <= cfg.max_target or target in numbers:
                continue
            target = int(target)
            if not check_countdown(solution, numbers, target, use_all=cfg.use_all):  # pragma: no cover
                raise AssertionError(f"countdown generator produced a wrong solution {solution!r}")
            key = f"{sorted(numbers)}->{target}"
            shown = ", ".join(map(str, numbers))
            rule = "exactly once" if cfg.use_all else "at most once"
            prompt = (
                f"Using the numbers [{shown}], each {rule}, and the operations +, -, *, /, "
                f"write an arithmetic expression that equals {target}. "
                f"Give the expression (not its value) as your final answer."
            )
            meta = {"numbers": numbers, "target": target, "solution": solution, "use_all": cfg.use_all}
            return key, Problem(prompt, str(target), task="countdown", grader="countdown", meta=meta)

    return draw


def _sorting_draw(cfg: SortingConfig):
    def draw(rng: random.Random):
        xs = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(cfg.length)]
        desc = cfg.order == "desc"
        answer = ", ".join(map(str, sorted(xs, reverse=desc)))
        word = "descending" if desc else "ascending"
        prompt = f"Sort the numbers {', '.join(map(str, xs))} in {word} order."
        return ",".join(map(str, xs)) + f":{cfg.order}", Problem(
            prompt, answer, task="sorting", grader="sorting", meta={"numbers": xs, "order": cfg.order}
        )

    return draw


def _generated(name: str, cfg: _GeneratedConfig, draw, spec: str, seed: int) -> Task:
    train = _draw_split(name, seed, "train", cfg.n_train, cfg.eval_frac, draw)
    eval_ = _draw_split(name, seed, "eval", cfg.n_eval, cfg.eval_frac, draw)
    return Task(name, spec, seed, dataclasses.asdict(cfg), train, eval_)
