"""scale.tasks: generated tasks, the safe arithmetic parser, checkers, dataset files, prompts, make_task."""

from __future__ import annotations

import builtins
import json
from fractions import Fraction

import pytest

from scale.tasks import (
    DEFAULT_INSTRUCTION,
    ExpressionError,
    Problem,
    check_countdown,
    check_sorted,
    evaluate_arithmetic,
    format_prompt,
    load_problems,
    make_task,
    parse_reference_answer,
    split_problems,
)

GENERATED = [
    "arithmetic:digits=2,ops=3,n_train=300,n_eval=60",
    "arithmetic:digits=1,ops=2,operators=+-*/,n_train=300,n_eval=60",
    "countdown:n_train=200,n_eval=40",
    "countdown:numbers=3,use_all=true,n_train=200,n_eval=40",
    "sorting:length=4,n_train=200,n_eval=40",
]


def _records(problems):
    return [(p.id, p.prompt, p.answer, p.grader, dict(p.meta)) for p in problems]


# ----------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("spec", GENERATED)
def test_generated_tasks_are_deterministic_given_the_seed(spec):
    a, b, c = make_task(spec, seed=3), make_task(spec, seed=3), make_task(spec, seed=4)
    assert _records(a.train) == _records(b.train) and _records(a.eval) == _records(b.eval)
    assert _records(a.train) != _records(c.train)


@pytest.mark.parametrize("spec", GENERATED)
def test_train_and_eval_never_overlap_even_across_seeds(spec):
    tasks = [make_task(spec, seed=s) for s in (0, 1, 2)]
    for t in tasks:
        n_train = int(spec.split("n_train=")[1].split(",")[0])
        assert len(t.train) == n_train and len(t.eval) == int(spec.split("n_eval=")[1])
        assert len({p.id for p in t.train}) == len(t.train)  # distinct within a split
        assert len({p.prompt for p in t.eval}) == len(t.eval)
    train_ids = {p.id for t in tasks for p in t.train}
    eval_ids = {p.id for t in tasks for p in t.eval}
    assert train_ids.isdisjoint(eval_ids)
    train_prompts = {p.prompt for t in tasks for p in t.train}
    assert train_prompts.isdisjoint({p.prompt for t in tasks for p in t.eval})


def _reference_value(operands, operators):
    """Independent evaluation: * and / first (left to right), then + and - (left to right)."""
    vals, ops = [Fraction(operands[0])], []
    for op, x in zip(operators, operands[1:], strict=True):
        if op in "*/":
            vals[-1] = vals[-1] * x if op == "*" else vals[-1] / x
        else:
            vals.append(Fraction(x))
            ops.append(op)
    total = vals[0]
    for op, v in zip(ops, vals[1:], strict=True):
        total = total + v if op == "+" else total - v
    return total


@pytest.mark.parametrize(
    "spec,digits,n_ops,allowed",
    [
        ("arithmetic:digits=2,ops=3,n_train=200,n_eval=20", 2, 3, "+-*"),
        ("arithmetic:digits=1,ops=4,operators=+-*/,n_train=200,n_eval=20", 1, 4, "+-*/"),
        ("arithmetic:digits=3,ops=1,operators=/,n_train=100,n_eval=20", 3, 1, "/"),
    ],
)
def test_arithmetic_answers_are_correct(spec, digits, n_ops, allowed):
    task = make_task(spec, seed=0)
    saw_fraction = False
    for p in task.train + task.eval:
        operands, ops = p.meta["operands"], p.meta["operators"]
        assert len(ops) == n_ops and len(operands) == n_ops + 1 and set(ops) <= set(allowed)
        assert all(len(str(x)) == digits for x in operands)
        expr = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:], strict=True)])
        assert expr in p.prompt
        want = _reference_value(operands, ops)
        saw_fraction |= want.denominator != 1
        assert p.answer == (
            str(want.numerator) if want.denominator == 1 else f"{want.numerator}/{want.denominator}"
        )
    if "/" in allowed:
        assert saw_fraction


def test_countdown_problems_are_solvable_and_well_formed():
    task = make_task("countdown:numbers=4,max_value=25,max_target=100,n_train=300,n_eval=50", seed=1)
    for p in task.train + task.eval:
        numbers, target = p.meta["numbers"], int(p.answer)
        assert p.grader == "countdown" and len(numbers) == 4 and all(1 <= x <= 25 for x in numbers)
        assert 1 <= target <= 100 and target not in numbers and str(numbers)[1:-1] in p.prompt
        assert check_countdown(p.meta["solution"], numbers, target)
    task = make_task("countdown:numbers=3,use_all=true,n_train=100,n_eval=10", seed=1)
    for p in task.train:
        assert check_countdown(p.meta["solution"], p.meta["numbers"], int(p.answer), use_all=True)
        assert "exactly once" in p.prompt


def test_sorting_answers_are_sorted_lists():
    for order in ("asc", "desc"):
        task = make_task(f"sorting:length=6,min_value=-5,max_value=20,order={order},n_train=100,n_eval=10")
        for p in task.train:
            xs = p.meta["numbers"]
            assert len(xs) == 6 and all(-5 <= x <= 20 for x in xs)
            assert p.answer == ", ".join(map(str, sorted(xs, reverse=order == "desc")))
            assert check_sorted(p.answer, p.answer)


def test_too_small_problem_space_is_an_error():
    with pytest.raises(ValueError, match=r"n_train=5000 is too many"):
        make_task("sorting:length=2,min_value=0,max_value=3,n_train=5000,n_eval=1")


# ------------------------------------------------------------------------------ safe arithmetic parser


def test_safe_parser_precedence_and_forms():
    assert evaluate_arithmetic("2 + 3 * 4")[0] == 14
    assert evaluate_arithmetic("(2 + 3) * 4")[0] == 20
    assert evaluate_arithmetic("10 - 4 - 3")[0] == 3
    assert evaluate_arithmetic("12 / 4 / 3")[0] == 1
    assert evaluate_arithmetic("7 / 2")[0] == Fraction(7, 2)
    assert evaluate_arithmetic(r"\frac{3}{4} \times 8 \div 2")[0] == 3
    assert evaluate_arithmetic(r"\left(1 + 2\right) · 3 − 1 ÷ 1")[0] == 8
    assert evaluate_arithmetic("-(3 - 5)")[0] == 2
    assert evaluate_arithmetic("[1 + {2 * 3}]") == (7, [1, 2, 3])


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('echo hacked')",
        "__import__('os')",
        "().__class__.__bases__",
        "eval('1+1')",
        "open('/etc/passwd')",
        "lambda: 1",
        "1 + 1; import os",
        "2 ** 10",
        "2(3)",
        "3 4",
        "1 / 0",
        "1 / (2 - 2)",
        "",
        "(1 + 2",
        "1 +",
        "x + 1",
        "9 if 1 else 2",
    ],
)
def test_safe_parser_rejects_everything_else(text, monkeypatch):
    def no_eval(*args, **kwargs):  # pragma: no cover - must never be called
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    with pytest.raises(ExpressionError):
        evaluate_arithmetic(text)
    assert check_countdown(text, [1, 2, 3, 10, 0], 2) is False


def test_safe_parser_limits():
    with pytest.raises(ExpressionError, match="longer than"):
        evaluate_arithmetic("1+" * 600 + "1")
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate_arithmetic("(" * 60 + "1" + ")" * 60)
    with pytest.raises(ExpressionError, match="decimal"):
        evaluate_arithmetic("1.5 + 1", allow_decimals=False)
    with pytest.raises(ExpressionError, match="unary"):
        evaluate_arithmetic("-1 + 3", allow_unary=False)


@pytest.mark.parametrize(
    "expr,ok",
    [
        ("(25 - 5) * 4", True),
        ("4 * (25 - 5)", True),
        (r"(25 - 5) \times 4", True),
        ("(25 - 5) * 4 = 80", True),
        ("(25 - 5) * 4 = 81", False),  # claims the wrong value
        ("25 * 4 - 5 * 4", False),  # 4 used twice
        ("25 * 4 - 20", False),  # 20 is not given
        ("25 * 4", False),  # 100, not 80
        ("80", False),
        ("(25 - 5) * 4.0", False),  # decimals are not numbers from the list
        ("7 * 25 / 5 * 4 - 60", False),
        ("", False),
        (None, False),
    ],
)
def test_countdown_checker(expr, ok):
    assert check_countdown(expr, [25, 5, 4, 7], 80) is ok


def test_countdown_exact_division_and_use_all():
    assert check_countdown("7 / 2 * 2", [7, 2, 2], 7)  # exact rational arithmetic
    assert not check_countdown("7 / 2", [7, 2], 3)  # no integer rounding
    assert check_countdown("25 * 4 - 20", [25, 4, 20, 3], 80)
    assert not check_countdown("25 * 4 - 20", [25, 4, 20, 3], 80, use_all=True)
    assert check_countdown("(25 * 4 - 20) * 3 / 3", [25, 4, 20, 3, 3], 80, use_all=True)


def test_sorting_checker():
    ref = "1, 3, 3, 7"
    for good in [
        "1, 3, 3, 7",
        "[1, 3, 3, 7]",
        "(1,3,3,7)",
        "1 3 3 7",
        r"\left[1, 3, 3, 7\right]",
        "1, 3, 3, 7.",
    ]:
        assert check_sorted(good, ref), good
    for bad in ["1, 3, 7", "7, 3, 3, 1", "1, 3, 3, 7, 9", "1, 3, three, 7", "", None, "__import__('os')"]:
        assert not check_sorted(bad, ref), bad


# ------------------------------------------------------------------------------------- dataset files


def _write_jsonl(path, rows):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


def test_gsm8k_answer_parsing():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"
    )
    assert parse_reference_answer(solution) == "72"
    assert parse_reference_answer("so #### 1,234") == "1234"
    assert parse_reference_answer("a #### b #### -5 ") == "-5"
    assert parse_reference_answer(r" \frac{1}{2} ") == r"\frac{1}{2}"
    assert parse_reference_answer(42) == "42" and parse_reference_answer(3.0) == "3"
    assert parse_reference_answer("x #### 5", gsm8k="false") == "x #### 5"
    with pytest.raises(ValueError, match="####"):
        parse_reference_answer("72", gsm8k=True)
    with pytest.raises(ValueError, match="empty"):
        parse_reference_answer("####  ")


def test_load_jsonl_gsm8k_and_plain(tmp_path):
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "Q1?", "answer": "work\n#### 72"},
            "",
            {"question": "Q2?", "answer": "1/2"},
            {"question": "Q3?", "answer": 7},
        ],
    )
    probs = load_problems(path)
    assert [p.answer for p in probs] == ["72", "1/2", "7"]
    assert [p.id for p in probs] == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:4"]
    assert probs[0].meta["solution"] == "work\n#### 72" and probs[0].grader == "math"
    custom = _write_jsonl(tmp_path / "c.jsonl", [{"problem": "P?", "solution": "9", "uid": "a"}])
    (p,) = load_problems(custom, question_field="problem", answer_field="solution", id_field="uid")
    assert (p.prompt, p.answer, p.id) == ("P?", "9", "a")


@pytest.mark.parametrize(
    "bad_line,match",
    [
        ('{"question": "Q", "answer": ', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"question": "Q"}', "missing field 'answer'"),
        ('{"question": "", "answer": "1"}', "non-empty string"),
        ('{"question": "Q", "answer": "####"}', "empty"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "Q?", "answer": "1"})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match) as err:
        load_problems(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_load_parquet_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["A?", "B?"], "a": ["x\n#### 3", "4"]}), path)
    probs = load_problems(path, question_field="q", answer_field="a")
    assert [(p.prompt, p.answer, p.task) for p in probs] == [("A?", "3", "parquet"), ("B?", "4", "parquet")]
    with pytest.raises(ValueError, match=r"row 1: missing field 'question'"):
        load_problems(path)
    task = make_task(f"parquet:path={path},question=q,answer=a,eval_frac=0.5", seed=0)
    assert len(task.train) == 1 and len(task.eval) == 1


def test_unsupported_or_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_problems(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not found"):
        load_problems(tmp_path / "nope.jsonl")


def test_file_task_eval_fraction_is_seeded_and_disjoint(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": str(i)} for i in range(40)]
    rows += [{"question": "Q3?", "answer": "3"}, {"question": "Q  7?", "answer": "7"}]  # duplicates
    path = _write_jsonl(tmp_path / "all.jsonl", rows)
    a = make_task(f"jsonl:path={path},eval_frac=0.25", seed=0)
    b = make_task(f"jsonl:path={path},eval_frac=0.25", seed=0)
    c = make_task(f"jsonl:path={path},eval_frac=0.25", seed=1)
    assert _records(a.eval) == _records(b.eval) and _records(a.eval) != _records(c.eval)
    assert len(a.train) + len(a.eval) == len(rows)
    assert len({p.prompt for p in a.eval}) == 10
    assert {p.prompt for p in a.train}.isdisjoint({p.prompt for p in a.eval})
    q3 = [p for p in a.train + a.eval if p.prompt == "Q3?"]
    assert len(q3) == 2 and (q3[0] in a.train) == (q3[1] in a.train)


def test_file_task_with_explicit_eval_file_drops_overlap(tmp_path):
    train = _write_jsonl(tmp_path / "tr.jsonl", [{"question": f"Q{i}?", "answer": str(i)} for i in range(5)])
    test = _write_jsonl(
        tmp_path / "te.jsonl", [{"question": "Q1?", "answer": "1"}, {"question": "Z?", "answer": "0"}]
    )
    task = make_task(f"jsonl:path={train},eval_path={test}", seed=0)
    assert [p.prompt for p in task.eval] == ["Q1?", "Z?"]
    assert [p.prompt for p in task.train] == ["Q0?", "Q2?", "Q3?", "Q4?"]
    assert task.info["n_dropped_overlap"] == 1
    task = make_task(f"jsonl:path={train},limit=2,eval_frac=0", seed=0)
    assert len(task.train) == 2 and task.eval == []


def test_split_problems_keeps_order():
    probs = [Problem(f"Q{i}", str(i)) for i in range(10)]
    train, eval_ = split_problems(probs, 0.3, seed=5)
    assert len(eval_) == 3 and train + eval_ != probs
    assert train == [p for p in probs if p in train] and eval_ == [p for p in probs if p in eval_]


# ------------------------------------------------------------------------------------------ prompts


class FakeChatTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_format_prompt_plain_and_chat():
    p = Problem("What is 2 + 3?", "5")
    assert format_prompt(p) == f"What is 2 + 3?\n{DEFAULT_INSTRUCTION}\n"
    assert format_prompt(p, instruction=None) == "What is 2 + 3?\n"
    assert format_prompt(p, system="Be brief.") == f"Be brief.\nWhat is 2 + 3?\n{DEFAULT_INSTRUCTION}\n"
    assert r"\boxed{}" in DEFAULT_INSTRUCTION

    class NoTemplate:
        chat_template = None

    assert format_prompt(p, NoTemplate()) == format_prompt(p)
    tok = FakeChatTokenizer()
    text = format_prompt(p, tok, system="S")
    (messages, kwargs) = tok.calls[0]
    assert kwargs == {"tokenize": False, "add_generation_prompt": True}
    assert messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": f"What is 2 + 3?\n{DEFAULT_INSTRUCTION}"},
    ]
    assert text == f"<system>S<user>What is 2 + 3?\n{DEFAULT_INSTRUCTION}<assistant>"


def test_format_prompt_with_a_real_chat_template():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    p = Problem("What is 2 + 3?", "5")
    assert format_prompt(p, tok) == format_prompt(p)  # no template: plain text
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert format_prompt(p, tok) == f"<|user|>What is 2 + 3?\n{DEFAULT_INSTRUCTION}\n<|assistant|>"


def test_problem_record():
    p = Problem("Q", "1", id="x", meta={"a": 1})
    assert p.messages(instruction=None) == [{"role": "user", "content": "Q"}]
    assert p == Problem("Q", "1", id="x", meta={"b": 2})  # meta is not part of equality
    with pytest.raises(ValueError, match="grader"):
        Problem("Q", "1", grader="regex")


# ----------------------------------------------------------------------------------------- make_task


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuchtask", r"unknown task 'nosuchtask'; known tasks: arithmetic, countdown"),
        ("arithmetic:digts=2", r"arithmetic: unknown parameter 'digts'"),
        ("arithmetic:digits=two", r"arithmetic.digits expects an integer, got 'two'"),
        ("arithmetic:digits=0", r"arithmetic.digits must lie in \[1, 12\], got 0"),
        ("arithmetic:operators=+^", r"arithmetic.operators must be distinct characters"),
        ("arithmetic:digits", r"expected key=value, got 'digits'"),
        ("arithmetic:ops=2,ops=3", r"parameter 'ops' given twice"),
        ("countdown:use_all=maybe", r"countdown.use_all expects true or false"),
        ("countdown:numbers=9", r"countdown.numbers must lie in \[2, 8\]"),
        ("sorting:order=random", r"sorting.order must be asc or desc"),
        ("arithmetic:eval_frac=1.5", r"arithmetic.eval_frac must lie in \(0, 1\)"),
        ("jsonl", r"jsonl.path is required"),
        ("jsonl:path=data.parquet", r"does not end in .jsonl"),
        ("", r"non-empty string"),
    ],
)
def test_make_task_errors_name_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        make_task(spec)


def test_make_task_rejects_a_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_task("arithmetic", seed="0")


@pytest.mark.parametrize("text", ["1", "true", "yes", "YES", "0", "false", "no"])
def test_make_task_reads_booleans_as_make_rule_does(text):
    """One spec parser (theory.spec): a boolean means the same in a task spec and a rule spec."""
    from theory.rules import make_rule

    expected = text.lower() in ("1", "true", "yes")
    task = make_task(f"countdown:numbers=3,n_train=3,n_eval=1,use_all={text}")
    assert task.params["use_all"] is expected
    assert all(p.meta["use_all"] is expected for p in task.train + task.eval)
    assert make_rule(f"clip_v:center={text}").center is expected


def test_make_task_rejects_a_boolean_make_rule_rejects():
    from theory.rules import make_rule

    with pytest.raises(ValueError, match=r"countdown\.use_all expects true or false, got 'maybe'"):
        make_task("countdown:use_all=maybe")
    with pytest.raises(ValueError, match=r"clip_v\.center expects true or false, got 'maybe'"):
        make_rule("clip_v:center=maybe")
