r"""The trainer's configuration as flags and files: ``--help`` from the dataclass docstrings, YAML/JSON.

:mod:`scale.config` defines the sections; this module turns them into the ``entdyn train`` parser (one
flag per field, the help text taken from the field's line in its class's ``Attributes:`` section, so the
documentation has one source), reads and writes configuration files, and resolves the precedence::

    dataclass defaults < --resume RUN_DIR's saved config < --config FILE < the flags typed

Values from files and flags are converted by :func:`scale.config.coerce_field` (:func:`theory.spec.coerce`).
No torch import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from theory.spec import field_types

from .config import SECTIONS, ConfigError, TrainConfig, coerce_field, validate

__all__ = [
    "TRAIN_DESCRIPTION",
    "add_train_arguments",
    "build_parser",
    "config_from_dict",
    "config_to_dict",
    "field_docs",
    "load_config_file",
    "parse_args",
    "resolve",
    "save_config",
    "saved_config_path",
]

# --------------------------------------------------------------------------------------------------
# Field documentation and types


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a dataclass docstring (Google style)."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent, current = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None
            continue
        ind = len(line) - len(line.lstrip())
        m = re.match(r"(\w+):\s*(.*)$", line.strip())
        if indent is None and m:
            indent = ind
        if indent is not None and ind < indent:
            break
        if m and ind == indent:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


# --------------------------------------------------------------------------------------------------
# dict <-> config, files


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The configuration as a nested plain dict (section -> field -> value)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def _make_section(cls: type, values: dict[str, Any], where: str):
    try:
        return cls(**values)
    except ConfigError as err:  # a section's own check (LossConfig's) names its field
        raise err.within(where) from None


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a nested dict, on top of ``base`` (default: the defaults).

    Unknown sections or fields raise :class:`ConfigError` naming them; values are converted to each
    field's type (``"1e-5"`` -> float, ``"none"`` -> None for optional fields).
    """
    if not isinstance(data, dict):
        raise ConfigError("config", f": expected a mapping of sections, got {type(data).__name__}")
    base = TrainConfig() if base is None else base
    out = {}
    for name, cls in SECTIONS.items():
        current = dataclasses.asdict(getattr(base, name))
        given = data.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(name, f"must be a mapping of fields, got {given!r}")
        hints = field_types(cls)
        for key, value in given.items():
            if key not in current:
                raise ConfigError(f"{name}.{key}", f"is not a field of {name}; fields: {', '.join(current)}")
            current[key] = coerce_field(value, hints[key], f"{name}.{key}")
        out[name] = _make_section(cls, current, name)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"is not a config section; sections: {', '.join(SECTIONS)}")
    return TrainConfig(**out)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f": file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return data or {}


def save_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (``config.json`` without PyYAML)."""
    run_dir = Path(run_dir)
    data = config_to_dict(cfg)
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers
        path = run_dir / "config.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def saved_config_path(run_dir: str | Path) -> Path:
    """``run_dir/config.yaml`` or ``run_dir/config.json``, whichever exists."""
    for name in ("config.yaml", "config.json"):
        p = Path(run_dir) / name
        if p.is_file():
            return p
    raise ConfigError(
        "run.resume", f": {str(run_dir)!r} has no config.yaml or config.json (not a run directory)"
    )


# --------------------------------------------------------------------------------------------------
# Command line


def _flag(section: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name).replace("_", "-")


def _iter_fields():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            yield section, cls, f, hints[f.name], docs.get(f.name, "")


def _fmt_default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


TRAIN_DESCRIPTION = (
    "GRPO fine-tuning of a causal LM on a verifiable task with a theory.rules entropy-control rule, "
    "logging the entropy dynamics (measured vs predicted entropy change per update). "
    "Precedence: defaults < --resume RUN_DIR's saved config < --config FILE < flags."
)


def build_parser(prog: str = "entdyn train") -> argparse.ArgumentParser:
    """The ``entdyn train`` parser: ``--config``, and one flag per config field (help = its docs).

    Flags not given on the command line are absent from the parsed namespace (``SUPPRESS``), so a
    config file or a resumed run's saved config is only overridden by what the user typed.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=TRAIN_DESCRIPTION, argument_default=argparse.SUPPRESS
    )
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per config field to ``parser`` (dest ``section.field``); the
    ``entdyn train`` subcommand and :func:`build_parser` share it. ``parser`` should have
    ``argument_default=argparse.SUPPRESS``."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file, nested by section")
    seen: dict[str, str] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for section, cls, f, tp, doc in _iter_fields():
        flag = _flag(section, f)
        if flag in seen:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"flag --{flag} of {section}.{f.name} clashes with {seen[flag]}")
        seen[flag] = f"{section}.{f.name}"
        group = groups.get(section)
        if group is None:
            group = groups[section] = parser.add_argument_group(
                section, (cls.__doc__ or "").strip().splitlines()[0]
            )
        default = getattr(getattr(defaults, section), f.name)
        base = _non_optional(tp)
        where = f"{section}.{f.name}"
        help_text = f"{doc} [{where}; default: {_fmt_default(default)}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": where, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        else:
            kwargs["type"] = _cli_type(tp, where)
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, "TEXT")
        group.add_argument(f"--{flag}", **kwargs)


def _non_optional(tp):
    """``X`` for ``X | None``, else ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and len(typing.get_args(tp)) == 2 else tp


def _cli_type(tp, where: str):
    def convert(text: str):
        try:
            return coerce_field(text, tp, where)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(_non_optional(tp), "__name__", "value")
    return convert


def parse_args(argv: Sequence[str] | None = None, *, validate_config: bool = True) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from command-line arguments (see the module docstring).

    ``--resume RUN_DIR`` loads ``RUN_DIR/config.yaml`` as the base and sets ``run.out`` to ``RUN_DIR``
    (a different ``--out`` is an error).
    """
    args = vars(build_parser().parse_args(argv))
    return resolve(args, validate_config=validate_config)


def resolve(args: dict[str, Any], *, validate_config: bool = True) -> TrainConfig:
    """Merge ``{"section.field": value}`` overrides (and ``config``: a file) as :func:`parse_args` does."""
    args = dict(args)
    config_file = args.pop("config", None)
    base = TrainConfig()
    resume = args.get("run.resume")
    if resume:
        base = config_from_dict(load_config_file(saved_config_path(resume)))
    if config_file:
        base = config_from_dict(load_config_file(config_file), base)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in args.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    cfg = config_from_dict(nested, base)
    if resume:
        out = args.get("run.out")
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise ConfigError("run.out", f": --resume continues the run in {resume!r}; --out {out!r} differs")
        # the interrupted run's stop point does not carry over
        stop = cfg.run.stop_after if "run.stop_after" in args else None
        run = dataclasses.replace(cfg.run, out=str(resume), resume=str(resume), stop_after=stop)
        cfg = dataclasses.replace(cfg, run=run)
    return validate(cfg) if validate_config else cfg
