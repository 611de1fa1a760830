"""Local datasets (``jsonl`` / ``parquet``): reading, GSM8K reference answers, seeded eval splits."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generated import _require, _rng
from .problems import Problem, Task


@dataclass(frozen=True)
class FileConfig:
    """``jsonl`` / ``parquet``: a question/answer file, with an eval file or a seeded eval fraction."""

    path: str = ""
    eval_path: str | None = None
    eval_frac: float = 0.1
    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    gsm8k: str = "auto"
    limit: int = 0

    def validate(self, name: str) -> None:
        _require(bool(self.path), f"{name}.path", "is required", self.path)
        _require(0.0 <= self.eval_frac < 1.0, f"{name}.eval_frac", "must lie in [0, 1)", self.eval_frac)
        _require(
            self.gsm8k in ("auto", "true", "false"),
            f"{name}.gsm8k",
            "must be auto, true or false",
            self.gsm8k,
        )
        _require(self.limit >= 0, f"{name}.limit", "must be >= 0 (0 = no limit)", self.limit)


def parse_reference_answer(text: Any, gsm8k: str | bool = "auto") -> str:
    """The final answer from a dataset answer field.

    GSM8K convention (arXiv 2110.14168, ``openai/gsm8k``): the field holds the worked solution ending
    with ``#### <answer>``; the text after the last ``####`` is returned, stripped, with thousands
    separators in numbers removed (``"#### 1,234"`` -> ``"1234"``). ``gsm8k="auto"`` applies this when
    ``####`` occurs, ``True`` requires it (``ValueError`` otherwise), ``False`` never applies it.
    Non-string values (ints, floats from Parquet) are converted with ``str``.

    >>> parse_reference_answer("She has 3 + 4 = 7 apples.\\n#### 7"), parse_reference_answer(" 1/2 ")
    ('7', '1/2')
    """
    mode = (
        {"auto": "auto", "true": True, "false": False}.get(gsm8k, gsm8k) if isinstance(gsm8k, str) else gsm8k
    )
    if text is None:
        raise ValueError("answer is missing (None)")
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    text = str(text)
    if mode is not False and "####" in text:
        final = text.rsplit("####", 1)[1].strip()
        final = re.sub(r"(?<=\d),(?=\d{3}\b)", "", final)
    elif mode is True:
        raise ValueError("answer has no GSM8K '####' final-answer marker")
    else:
        final = text.strip()
    if not final:
        raise ValueError("answer is empty")
    return final


def problems_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    gsm8k: str | bool = "auto",
    source: str = "records",
    unit: str = "record",
    task: str = "records",
    positions: Iterable[int] | None = None,
) -> list[Problem]:
    """:class:`Problem` records from dicts (a ``datasets.Dataset`` iterates as dicts).

    Errors (not a mapping, a missing or empty field, a bad GSM8K answer) raise ``ValueError`` naming
    ``source`` and the position ``unit N`` (``positions``, default 1, 2, ...). Without ``id_field`` the
    id is ``"<source file name>:N"``.
    """
    out = []
    for i, rec in zip(itertools.count(1) if positions is None else positions, records, strict=False):
        where = f"{source}: {unit} {i}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in (question_field, answer_field) + ((id_field,) if id_field else ()):
            if key not in rec:
                raise ValueError(f"{where}: missing field {key!r} (fields: {', '.join(map(str, rec))})")
        question = rec[question_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field {question_field!r} must be a non-empty string")
        try:
            answer = parse_reference_answer(rec[answer_field], gsm8k)
        except ValueError as err:
            raise ValueError(f"{where}: field {answer_field!r}: {err}") from None
        meta = {k: v for k, v in rec.items() if k not in (question_field, id_field)}
        if answer != str(rec[answer_field]).strip():
            meta["solution"] = rec[answer_field]
        pid = str(rec[id_field]) if id_field else f"{Path(source).name}:{i}"
        out.append(Problem(question.strip(), answer, id=pid, task=task, meta=meta))
    return out


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                byte = raw[err.start] if err.start < len(raw) else 0
                msg = f"not UTF-8 (byte {byte:#04x} at byte {err.start + 1}); save the file as UTF-8"
                raise ValueError(f"{path}: line {lineno}: {msg}") from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                msg = f"malformed JSON ({err.msg} at column {err.colno})"
                raise ValueError(f"{path}: line {lineno}: {msg}") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import tempfile

    import datasets  # lazy: heavy (pyarrow, pandas)

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="entdyn-parquet-") as cache:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache)
            return list(ds)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def load_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    gsm8k: str | bool = "auto",
    task: str | None = None,
) -> list[Problem]:
    """Load problems from a ``.jsonl`` (one JSON object per line) or ``.parquet`` file.

    JSONL is parsed line by line: blank lines are skipped; a line that is not valid JSON, not an
    object, or lacks a field raises ``ValueError`` with the file path and the 1-based line number.
    Parquet is read with :meth:`datasets.Dataset.from_parquet` (into a temporary cache, so nothing is
    left behind); errors name the 1-based row. Answers go through :func:`parse_reference_answer`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    kw = dict(question_field=question_field, answer_field=answer_field, id_field=id_field, gsm8k=gsm8k)
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
        return problems_from_records(
            [rec for _, rec in rows],
            positions=[lineno for lineno, _ in rows],
            source=str(path),
            unit="line",
            task=task or "jsonl",
            **kw,
        )
    if suffix == ".parquet":
        return problems_from_records(
            _read_parquet(path), source=str(path), unit="row", task=task or "parquet", **kw
        )
    raise ValueError(f"unsupported dataset file type {suffix!r} for {path} (expected .jsonl or .parquet)")


def _question_key(p: Problem) -> str:
    return " ".join(p.prompt.split())


def split_problems(
    problems: Sequence[Problem], eval_frac: float, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Seeded split into ``(train, eval)`` by question: all copies of a question land in one split.

    ``round(eval_frac * n_questions)`` distinct questions (at least 1 when ``eval_frac > 0`` and there
    are at least 2 questions) go to eval; both keep the input order.
    """
    keys = list(dict.fromkeys(_question_key(p) for p in problems))
    n_eval = round(eval_frac * len(keys))
    if eval_frac > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    eval_keys = set(_rng("split", seed).sample(keys, n_eval)) if n_eval else set()
    train = [p for p in problems if _question_key(p) not in eval_keys]
    eval_ = [p for p in problems if _question_key(p) in eval_keys]
    return train, eval_


def _file_task(name: str, cfg: FileConfig, spec: str, seed: int) -> Task:
    kw = dict(
        question_field=cfg.question, answer_field=cfg.answer, id_field=cfg.id, gsm8k=cfg.gsm8k, task=name
    )
    for p in (cfg.path, cfg.eval_path):
        if p and Path(p).suffix.lower() != f".{name}":
            raise ValueError(f"{name}: file {p!r} does not end in .{name}")
    problems = load_problems(cfg.path, **kw)
    if cfg.limit:
        problems = problems[: cfg.limit]
    info: dict[str, Any] = {"n_dropped_overlap": 0}
    if cfg.eval_path:
        eval_ = load_problems(cfg.eval_path, **kw)
        eval_keys = {_question_key(p) for p in eval_}
        train = [p for p in problems if _question_key(p) not in eval_keys]
        info["n_dropped_overlap"] = len(problems) - len(train)
    else:
        train, eval_ = split_problems(problems, cfg.eval_frac, seed)
    return Task(name, spec, seed, dataclasses.asdict(cfg), train, eval_, info)
