"""scale.grading: answer extraction, the tricky-answer grader, the time bound, rewards and eval metrics."""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time

import numpy as np
import pytest

from scale.grading import (
    CorrectnessReward,
    RewardStats,
    SafeReward,
    answers_match,
    avg_at_k,
    evaluate_samples,
    extract_answer,
    extract_boxed,
    grade,
    grade_answer,
    grade_detailed,
    maj_at_k,
    majority_vote,
    normalize_answer,
    parse_number,
    pass_at_k_mean,
    safe_reward,
)
from scale.tasks import Problem

PATHOLOGICAL = r"The answer is $\boxed{9^{9^{9^{9}}}}$"

# ----------------------------------------------------------------------------------------- extraction


def test_boxed_extraction_balances_nested_braces_and_takes_the_last():
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"first \boxed{1}, then \boxed{\sqrt{\frac{a}{b}}} done") == r"\sqrt{\frac{a}{b}}"
    assert extract_boxed(r"\boxed{2} and a truncated \boxed{\frac{1}{") == "2"  # unclosed last box skipped
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces do not count
    assert extract_boxed(r"\fbox{5}") == "5"
    assert extract_boxed("no box") is None and extract_boxed(None) is None


@pytest.mark.parametrize(
    "text,want",
    [
        (r"The answer is 3. So \boxed{4}", "4"),  # 1. boxed beats "answer is"
        (r"Answer: 12. Then 13 more", "12"),  # 2. "answer:" beats the last number
        ("So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is 42 apples.\nThanks 99", "42 apples"),
        ("Step 1 ... the answer is 0.5.", "0.5"),
        ("work\n#### 1,234", "1,234"),  # GSM8K marker
        ("3 + 4 = 7, then 7 - 1 = 6", "6"),  # 3. the last number
        ("costs 1,234 dollars", "1,234"),
        ("it is -3", "-3"),
        ("I cannot solve this.", None),
        ("", None),
        (None, None),
    ],
)
def test_extraction_order(text, want):
    assert extract_answer(text) == want


# -------------------------------------------------------------------------------------------- grading

TRICKY = [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\frac{1}{2}}", "1/2"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", "0.5"),
    (r"\boxed{1,234}", "1234"),
    (r"\boxed{1234}", "1,234"),
    ("The answer is 1,234.", "1234"),
    (r"\boxed{42 apples}", "42"),
    ("The answer is 42 apples.", "42"),
    (r"\boxed{\$5}", "5"),
    ("So it costs $5", "5"),
    (r"\boxed{5 dollars}", "5"),  # math-verify alone reads this as 5*a*d*l*l*o*r*s
    (r"\boxed{5 \text{ dollars}}", "5"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{90^{\circ}}", "90"),
    (r"\boxed{ 7 }", "7"),
    (r"\boxed{-3}", "-3"),
    ("The answer is -3.", "-3"),
    (r"\boxed{-\frac{3}{4}}", "-0.75"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{50\%}", "50"),
    ("#### 18", "18"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),  # needs math-verify
    (r"\boxed{2 \times 3}", "6"),
    (r"\boxed{0.333333}", "1/3"),  # math-verify's float rounding (6 places)
]


@pytest.mark.parametrize("completion,reference", TRICKY)
def test_tricky_answers_grade_correct(completion, reference):
    assert grade(completion, reference), grade_detailed(completion, reference)


@pytest.mark.parametrize(
    "completion,reference",
    [
        (r"\boxed{3}", "-3"),
        (r"\boxed{-3}", "3"),
        (r"\boxed{8}", "7"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{1,235}", "1234"),
        (r"\boxed{43 apples}", "42"),
        (r"\boxed{\pi}", "3"),
        ("I don't know.", "7"),
        ("", "7"),
        (r"\boxed{}", "7"),
    ],
)
def test_wrong_or_missing_answers_grade_wrong(completion, reference):
    assert not grade(completion, reference)


def test_no_answer_is_method_none_and_fast_path_is_exact():
    assert grade_detailed("no idea", "7").method == "none"
    assert grade_detailed(r"\boxed{1,234}", "1234").method == "exact"
    assert grade_detailed(r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}").method == "math_verify"
    assert answers_match(None, "7") is False


def test_number_parsing_and_normalisation():
    assert parse_number(r"\frac{1}{2}") == parse_number("0.5") == parse_number(" 1/2 ")
    assert parse_number("-1,234.5") == -1234.5
    assert parse_number(r"\text{5} \text{ cm}") == 5
    assert parse_number("1,23") is None and parse_number("x + 1") is None and parse_number(None) is None
    assert normalize_answer(r"\frac{2}{4}") == normalize_answer("0.5") == "1/2"
    assert normalize_answer("x^2 + 1") == "x^2+1"


def test_pathological_input_respects_the_time_bound():
    grade(r"\boxed{x+1}", "1+x")  # warm math-verify up (its first call is slow and is not timed)
    bound = 0.5
    t0 = time.monotonic()
    result = grade_detailed(PATHOLOGICAL, "7", timeout_s=bound)
    elapsed = time.monotonic() - t0
    assert result.correct is False and result.method == "timeout"
    assert elapsed < bound + 3.0, elapsed  # interrupted (unbounded it runs for minutes); slack for load
    assert grade(r"\boxed{x+1}", "1+x", timeout_s=bound)  # the grader still works afterwards


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_time_bound_restores_an_outer_timer_and_handler():
    fired = []

    def outer(signum, frame):  # pragma: no cover - must not fire during the test
        fired.append(signum)

    old = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert not grade(PATHOLOGICAL, "7", timeout_s=0.3)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is outer and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.slow
def test_time_bound_outside_the_main_thread_uses_a_worker_process():
    out = {}

    def run():
        out["warm"] = grade(r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", timeout_s=60)  # starts the worker
        t0 = time.monotonic()
        out["slow"] = grade_detailed(PATHOLOGICAL, "7", timeout_s=0.5)
        out["elapsed"] = time.monotonic() - t0
        out["after"] = grade(r"\boxed{x+1}", "1+x", timeout_s=60)  # a fresh worker after the kill

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(180)
    assert not worker.is_alive()
    assert out["warm"] is True and out["after"] is True
    assert out["slow"].method == "timeout" and out["slow"].correct is False
    assert out["elapsed"] < 1.0 + 0.5, out["elapsed"]


def test_task_graders_dispatch():
    cd = Problem("reach 80", "80", grader="countdown", meta={"numbers": [25, 5, 4, 7], "use_all": False})
    assert grade(r"\boxed{(25 - 5) \times 4}", cd)
    assert not grade(r"\boxed{25 * 4 - 5 * 4}", cd)
    assert not grade(r"\boxed{__import__('os').system('true')}", cd)
    assert grade_detailed("no box", cd).method in ("none", "countdown")
    srt = Problem("sort 3 1 2", "1, 2, 3", grader="sorting")
    assert grade(r"\boxed{[1, 2, 3]}", srt) and not grade(r"\boxed{3, 2, 1}", srt)
    assert grade_answer("7", Problem("q", "7")).correct


# -------------------------------------------------------------------------------------------- rewards


def test_correctness_reward_schemes():
    r01, pm1 = CorrectnessReward(), CorrectnessReward.pm1()
    assert (r01(r"\boxed{7}", "7"), r01(r"\boxed{8}", "7")) == (1.0, 0.0)
    assert (pm1(r"\boxed{7}", "7"), pm1("nothing", "7")) == (1.0, -1.0)
    assert CorrectnessReward(correct=2.0, incorrect=-0.5)("x", "7") == -0.5


def test_safe_reward_counts_errors_and_strict_reraises():
    def boom(completion, problem):
        raise RuntimeError("reward model crashed")

    stats = RewardStats()
    assert safe_reward(boom, "c", "p", stats=stats) == 0.0
    assert safe_reward(lambda c, p: float("nan"), "c", "p", stats=stats) == 0.0
    assert safe_reward(lambda c, p: "1.0", "c", "p", stats=stats) == 0.0  # not a number
    assert safe_reward(lambda c, p: np.float32(0.5), "c", "p", stats=stats) == 0.5
    assert safe_reward(lambda c, p: np.array(2.0), "c", "p", stats=stats) == 2.0
    assert safe_reward(lambda c, p: True, "c", "p", stats=stats) == 1.0
    assert (stats.n_calls, stats.n_errors) == (6, 3)
    assert "reward model crashed" in stats.last_errors[0]
    assert safe_reward(boom, "c", "p") == 0.0  # no stats object is fine
    with pytest.raises(RuntimeError, match="crashed"):
        safe_reward(boom, "c", "p", strict=True)
    with pytest.raises(ValueError, match="nan"):
        safe_reward(lambda c, p: math.nan, "c", "p", strict=True)

    wrapped = SafeReward(lambda c, p: 1.0 if c == p else 1 / 0)
    assert wrapped.batch(["a", "b", "c"], ["a", "x", "c"]) == [1.0, 0.0, 1.0]
    assert (wrapped.n_calls, wrapped.n_errors) == (3, 1)
    with pytest.raises(ValueError, match="2 completions but 1 problems"):
        wrapped.batch(["a", "b"], ["a"])
    with pytest.raises(ZeroDivisionError):
        SafeReward(lambda c, p: 1 / 0, strict=True)("a", "b")


# -------------------------------------------------------------------------------------------- metrics


def test_majority_vote_normalises_and_breaks_ties_by_first_occurrence():
    assert majority_vote(["0.5", "3", r"\frac{1}{2}", "3", "1/2"]) == "0.5"  # 1/2 x3 beats 3 x2
    assert majority_vote(["3", "1/2", "0.5", "3"]) == "3"  # tie 2-2: "3" occurs first
    assert majority_vote(["1/2", "3", "3", "0.5"]) == "1/2"  # same tie, other order
    assert majority_vote([None, None, "4"]) == "4"  # no-answer samples do not vote
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_maj_and_avg_on_hand_cases():
    answers = [["7", "7", "8", "8"], ["1", None, None, None], ["5", "6", "6", "6"]]
    refs = ["8", "2", "6"]
    # problem 0: tie 7/8 -> "7" (first) -> wrong; problem 1: "1" -> wrong; problem 2: "6" -> right
    assert maj_at_k(answers, refs) == pytest.approx(1 / 3)
    # first 2 samples only: "7" / "1" / tie 5-6 -> "5": all wrong
    assert maj_at_k(answers, refs, k=2) == 0.0
    with pytest.raises(ValueError, match="at least 5 samples"):
        maj_at_k(answers, refs, k=5)
    correct = [[False, False, True, True], [False, False, False, False], [False, True, True, True]]
    assert avg_at_k(correct) == pytest.approx(5 / 12)


def _brute_force_pass_at_k(row, k):
    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pass_at_k_matches_brute_force(k):
    correct = np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool)
    want = np.mean([_brute_force_pass_at_k(row, k) for row in correct])
    assert pass_at_k_mean(correct, k) == pytest.approx(want, abs=1e-12)


def test_evaluate_samples_end_to_end():
    problems = [Problem("q0", "8"), Problem("q1", "1/2"), "6"]
    completions = [
        [r"\boxed{8}", r"\boxed{7}", "The answer is 8.", "so 9"],
        [r"\boxed{0.5}", "no idea", r"\boxed{\frac{1}{2}}", r"\boxed{1/3}"],
        ["5", "6", "6", r"\boxed{6 apples}"],
    ]
    res = evaluate_samples(problems, completions, ks=[1, 2, 4])
    correct = np.array([[1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=bool)
    assert (res.correct == correct).all()
    assert res.avg == pytest.approx(7 / 12)
    assert res.pass_at[1] == pytest.approx(res.avg)
    assert res.pass_at[2] == pytest.approx(np.mean([_brute_force_pass_at_k(r, 2) for r in correct]))
    assert res.pass_at[4] == 1.0
    assert res.maj_at[4] == 1.0  # 8 (2 votes vs 1 + 1), 1/2 (2 votes vs 1), 6 (3 votes vs 1)
    assert res.maj_at[1] == pytest.approx(2 / 3)  # 8, 0.5 right; 5 wrong
    assert res.maj_at[2] == pytest.approx(2 / 3)  # tie 8/7 -> 8 right; 0.5 right; tie 5/6 -> 5 wrong
    assert res.as_dict()["avg@4"] == res.avg and "pass@2" in res.as_dict() and "maj@4" in res.as_dict()
    assert res.methods["none"] == 1
    with pytest.raises(ValueError, match="same number"):
        evaluate_samples(problems, [["a"], ["b", "c"], ["d"]])
    with pytest.raises(ValueError, match=r"k must lie in \[1, n=4\]"):
        evaluate_samples(problems, completions, ks=[5])


def test_a_grader_registered_in_one_place_is_accepted_and_used():
    """The grader registry: one register_grader call, and problems, grade() and the reward use it."""
    from scale.grading import GRADERS, CorrectnessReward, GradeResult, grade, register_grader
    from scale.tasks import Problem

    with pytest.raises(ValueError, match="Problem.grader must be one of"):
        Problem("name a palindrome", "", grader="palindrome")

    def palindrome(answer, problem, timeout_s):
        ok = answer is not None and answer == answer[::-1]
        return GradeResult(ok, answer, "palindrome")

    register_grader("palindrome", palindrome)
    try:
        p = Problem("name a palindrome", "", grader="palindrome")
        assert grade(r"\boxed{level}", p) and not grade(r"\boxed{levels}", p)
        assert CorrectnessReward()(r"\boxed{noon}", p) == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_grader("palindrome", lambda a, p, t: GradeResult(False, a, "x"))
    finally:
        del GRADERS["palindrome"]
    assert sorted(GRADERS) == ["countdown", "math", "sorting"]
