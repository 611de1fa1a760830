r"""Graders, rewards and evaluation metrics for verifiable tasks (:mod:`scale.tasks`).

**Answer extraction** (:func:`extract_answer`), first rule that finds something wins:

1. the content of the last *complete* ``\boxed{...}`` (or ``\fbox{...}``), nested braces balanced, so
   ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``; a final ``\boxed{`` cut off by the length limit is
   skipped;
2. the text after the last "answer is", "answer:", "Answer =" (case-insensitive, e.g. "The final answer
   is 42 apples.") or GSM8K's ``#### 42``, up to the end of the line or of the sentence (a period
   followed by a space or the end), with surrounding ``$`` removed;
3. the last number in the text (``-3``, ``1,234``, ``0.5``, ``7/3``);

and ``None`` (graded wrong) when there is none.

**Answer comparison** (:func:`answers_match`), in order:

1. *fast exact path*: both strings parse as plain numbers after light normalisation
   (:func:`parse_number`: ``$``, ``\$``, ``\%``/``%``, ``^\circ``/``°``, ``\text{...}``, thousands
   separators ``1,234``, a leading ``x =``, and trailing unit words such as ``42 apples`` or ``5
   dollars`` are removed; ``a/b``, ``\frac{a}{b}`` and decimals are read exactly). Equal numbers are a
   match; two different *integers* are a mismatch; other numeric pairs go on to math-verify (its float
   rounding makes ``0.333333`` match ``1/3``). Identical normalised strings are a match too.
2. *math-verify* (HuggingFace ``math_verify``, https://github.com/huggingface/Math-Verify):
   ``verify(parse("\boxed{ref}"), parse("\boxed{pred}"))``, with a **hard time bound per call**
   (``timeout_s``, default :data:`DEFAULT_TIMEOUT_S`). A call that runs out of time, or raises, counts
   as wrong.

About the time bound: math-verify's own ``parsing_timeout`` / ``timeout_seconds`` options use
``signal.alarm`` with whole seconds, per parse and *per comparison pair*, and only in the main thread
(elsewhere ``parse`` / ``verify`` raise ``ValueError``). Nested inside a caller's own alarm they would
also cancel it (``alarm`` and ``setitimer(ITIMER_REAL)`` are one timer). So this module turns them off
(``parsing_timeout=None``, ``timeout_seconds=None``) and bounds the *whole* parse + verify call itself:
in the main thread with ``signal.setitimer`` (fractional seconds; any timer the caller had set is
restored afterwards), elsewhere (threads, or no ``setitimer``) in a persistent child Python process
(started with :mod:`subprocess`) that is killed and restarted when a call overruns. The first call
warms math-verify up (imports, sympy caches) outside the bound.

**Rewards.** :class:`CorrectnessReward` gives ``correct`` / ``incorrect`` (1 / 0 by default;
``CorrectnessReward.pm1()`` gives +1 / -1, the reward of arXiv 2508.02260's released code).
:func:`safe_reward` / :class:`SafeReward` call any reward function and turn an exception (or a result
that is not a finite number) into reward 0, counted in ``n_errors``; ``strict=True`` re-raises.

**Metrics over k samples per problem** (:func:`evaluate_samples`): ``avg@k`` is the mean accuracy over
all samples; ``pass@k`` the mean over problems of the unbiased estimator :func:`theory.pass_at_k`
(Chen et al. 2021, arXiv 2107.03374); ``maj@k`` grades the majority answer of the first ``k`` samples
(:func:`majority_vote`: votes go to :func:`normalize_answer` forms, samples without an answer do not
vote, and a tie goes to the tied answer that appears first in sample order).

**Graders** (:data:`GRADERS`): ``math`` (the comparison above), ``countdown`` and ``sorting`` (the task
checkers of :mod:`scale.tasks.checkers`); :func:`register_grader` adds one, and a
:class:`~scale.tasks.Problem` with that ``grader`` is then accepted and graded by it.

Modules: :mod:`.answers` (extraction, normalisation), :mod:`.verify` (bounded math-verify),
:mod:`.registry` (graders, grading), :mod:`.rewards`, :mod:`.metrics`. No torch import here;
``math_verify`` (and sympy) are imported on first use.
"""

from .answers import extract_answer, extract_boxed, normalize_answer, parse_number
from .metrics import EvalResult, avg_at_k, evaluate_samples, maj_at_k, majority_vote, pass_at_k_mean
from .registry import GRADERS, GradeResult, grade, grade_answer, grade_detailed, register_grader
from .rewards import CorrectnessReward, RewardStats, SafeReward, safe_reward
from .verify import DEFAULT_TIMEOUT_S, answers_match, math_verify_equal

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "GRADERS",
    "CorrectnessReward",
    "EvalResult",
    "GradeResult",
    "RewardStats",
    "SafeReward",
    "answers_match",
    "avg_at_k",
    "evaluate_samples",
    "extract_answer",
    "extract_boxed",
    "grade",
    "grade_answer",
    "grade_detailed",
    "maj_at_k",
    "majority_vote",
    "math_verify_equal",
    "normalize_answer",
    "parse_number",
    "pass_at_k_mean",
    "register_grader",
    "safe_reward",
]
