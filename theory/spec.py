r"""The one parser of the project's spec strings: ``name:key=value,key=value`` (and ``+`` to compose).

Rules (``clip_b:mu=2.0+position_bonus:gate=always``), tasks (``arithmetic:digits=2,ops=2``), the stage
detector (``stage_detector:window=20``) and the trainer's configuration values all go through this
module, so a value means the same thing everywhere. A value is converted by the type annotation of the
dataclass field it sets:

==============  ==================================================================================
field type      accepted text
==============  ==================================================================================
``bool``        ``true``/``false``, ``1``/``0``, ``yes``/``no`` (any case)
``int``         an integer (``12``, ``-3``, ``1e3``); a fractional value is an error
``float``       any number (``0.2``, ``1e-4``, ``3``)
``str``         the text, stripped
``Literal``     one of the listed strings
``X | None``    ``none`` / ``null`` (any case) for None, otherwise as ``X`` (a plain ``str`` keeps the text)
``tuple[X,..]`` elements separated by ``/`` (``clamp=0.8/1.2``), each as ``X``
==============  ==================================================================================

Names are case-insensitive and ``-`` equals ``_`` (``high-entropy-mask`` = ``high_entropy_mask``). A key
given twice, a key that is not a field, or ``key`` without ``=value`` is an error. Errors are
:class:`SpecError` (a ``ValueError``) carrying the dotted place (``where``, e.g. ``clip_b.mu``) and the
message, so callers can re-raise them under their own names without parsing the text.

Pure python, no array library.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

__all__ = ["SpecError", "parse_spec", "split_composite", "coerce", "field_types", "build", "normalise_name"]


class SpecError(ValueError):
    """A bad spec string or value; ``where`` is the dotted place (``"clip_b.mu"``), ``message`` the rest."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(where + message if message.startswith((":", ";")) else f"{where} {message}")


def normalise_name(name: str) -> str:
    """``"High-Entropy-Mask "`` -> ``"high_entropy_mask"``."""
    return name.strip().lower().replace("-", "_")


def parse_spec(spec: str, what: str = "spec") -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: raw text})``; the values stay unconverted.

    >>> parse_spec("Countdown:use_all=1, n_train=5")
    ('countdown', {'use_all': '1', 'n_train': '5'})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(what, f"must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = normalise_name(name)
    if not name:
        raise SpecError(what, f"names nothing before ':', got {spec!r}")
    params: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(name, f": expected key=value, got {item!r}")
        if key in params:
            raise SpecError(name, f": parameter {key!r} given twice")
        params[key] = value.strip()
    return name, params


# "+" separates specs only when a name follows, so "1e+9" stays one number
_PLUS = re.compile(r"\+(?=\s*[A-Za-z_][A-Za-z0-9_-]*\s*(?::|\+|$))")


def split_composite(spec: str) -> list[str]:
    """``"a:x=1+b"`` -> ``["a:x=1", "b"]`` (``+`` inside numbers such as ``1e+9`` does not split)."""
    return [p.strip() for p in _PLUS.split(str(spec)) if p.strip()]


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return tp, False


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` (spec text, or a value read from a JSON/YAML file) as the type ``tp``.

    >>> coerce("1", bool, "x"), coerce("1e3", int, "x"), coerce("none", float | None, "x")
    (True, 1000, None)
    >>> coerce("0.8/1.2", tuple[float, float], "x")
    (0.8, 1.2)
    >>> coerce("2.5", int, "task.digits")
    Traceback (most recent call last):
    ...
    theory.spec.SpecError: task.digits expects an integer, got '2.5'
    """
    base, optional = _unwrap_optional(tp)
    text = value.strip() if isinstance(value, str) else None
    if value is None:
        if optional:
            return None
        raise SpecError(where, f"must not be none (expected {getattr(base, '__name__', base)})")
    if optional and text is not None and text.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        got = text if text is not None else value
        if got not in choices:
            raise SpecError(where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return got
    if origin is tuple:
        args = typing.get_args(base)
        elems = text.split("/") if text is not None else value
        if not isinstance(elems, list | tuple):
            raise SpecError(where, f"expects values separated by '/', got {value!r}")
        elem_types = [args[0]] * len(elems) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(elem_types) != len(elems):
            raise SpecError(where, f"expects {len(elem_types)} values separated by '/', got {value!r}")
        return tuple(coerce(v, t, where) for v, t in zip(elems, elem_types, strict=True))
    if base is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise SpecError(where, f"expects true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and re.fullmatch(r"[-+]?\d+", text):
            return int(text)  # exact, however large
        number = _number(value, text)
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
        raise SpecError(where, f"expects an integer, got {value!r}")
    if base is float:
        number = _number(value, text)
        if number is None:
            raise SpecError(where, f"expects a number, got {value!r}")
        return float(number)
    if base is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return text if text is not None else str(value)
        raise SpecError(where, f"expects a string, got {value!r}")
    return value  # Any / unannotated: as given


def _number(value: Any, text: str | None) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if text is not None:
        try:
            return float(text)
        except ValueError:
            return None
    return None


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of the dataclass ``cls`` (init fields only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def build(cls: type, name: str, params: dict[str, Any]):
    """``cls(**params)`` with every value converted by :func:`coerce` to its field's type.

    Unknown keys raise :class:`SpecError` listing the fields; the class's own validation errors
    (``ValueError`` from ``__post_init__``) pass through unchanged.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     window: int = 50
    ...     strict: bool = False
    >>> build(Demo, "demo", {"window": "20", "strict": "1"})
    Demo(window=20, strict=True)
    """
    types_ = field_types(cls)
    kwargs = {}
    for key, raw in params.items():
        if key not in types_:
            raise SpecError(name, f": unknown parameter {key!r}; parameters: {', '.join(types_)}")
        kwargs[key] = coerce(raw, types_[key], f"{name}.{key}")
    return cls(**kwargs)
