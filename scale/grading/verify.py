"""math-verify under a hard time bound (a timer in the main thread, a killable worker process
elsewhere), and :func:`answers_match`: the fast exact path, then bounded math-verify."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .answers import normalize_answer, parse_number

DEFAULT_TIMEOUT_S = 2.0
"""Default bound, in seconds, on one math-verify comparison (parse of both sides + verify)."""


class _GraderTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify's ``except Exception`` lets it pass."""


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # we provide the timeout ourselves
        return not record.getMessage().startswith("Timeout is disabled")


_warm = False
_warm_lock = threading.Lock()


def _math_verify():
    global _warm
    import math_verify

    if not _warm:
        with _warm_lock:
            if not _warm:
                for name in ("math_verify.parser", "math_verify.grader"):
                    logging.getLogger(name).addFilter(_QuietTimeoutWarning())
                math_verify.verify(
                    math_verify.parse("$1$", parsing_timeout=None),
                    math_verify.parse(r"\boxed{\frac{2}{2}}", parsing_timeout=None),
                    timeout_seconds=None,
                )
                _warm = True
    return math_verify


def _math_verify_unbounded(pred: str, reference: str) -> bool:
    mv = _math_verify()
    gold = mv.parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = mv.parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(mv.verify(gold, target, timeout_seconds=None))


def _with_itimer(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn()`` in the main thread; raise :class:`_GraderTimeout` after ``timeout_s`` seconds."""

    def on_alarm(signum, frame):
        raise _GraderTimeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give an outer timer back what is left of it (at least 1 ms)
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def run_with_deadline(fn: Callable[[], Any], timeout_s: float | None, what: str = "the call") -> Any:
    """``fn()``, or ``TimeoutError`` naming ``what`` once it has run ``timeout_s`` seconds (None: unbounded).

    In the main thread a SIGALRM timer interrupts ``fn`` where it is (Python code, ``time.sleep``, most
    blocking I/O). Elsewhere (no signals there) ``fn`` runs in a daemon thread that is abandoned on overrun:
    the caller goes on, the thread may run to its end in the background.
    """
    if timeout_s is None:
        return fn()
    if _can_use_signals():
        try:
            return _with_itimer(fn, float(timeout_s))
        except _GraderTimeout:
            raise TimeoutError(f"{what} did not return within {timeout_s} s") from None
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True, name="entdyn-deadline")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(
            f"{what} did not return within {timeout_s} s (left running in a background thread)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _worker_stdio() -> None:  # pragma: no cover - runs in the child process
    """Child side of :class:`_Worker`: JSON lines ``[pred, reference]`` in, ``["ok", bool]`` out."""
    import json
    import sys

    _math_verify()
    print(json.dumps(["ready", None]), flush=True)
    for line in sys.stdin:
        try:
            pred, reference = json.loads(line)
            reply = ["ok", _math_verify_unbounded(pred, reference)]
        except Exception as err:
            reply = ["error", repr(err)]
        print(json.dumps(reply), flush=True)


class _Worker:
    """A child Python process that runs math-verify, for callers outside the main thread.

    Started with :mod:`subprocess` (``python -c "...; _worker_stdio()"``), not :mod:`multiprocessing`,
    so the caller's ``__main__`` script is never re-imported in the child. A call that overruns its
    bound kills the child; the next call starts a fresh one (start-up is not charged to that call).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.replies = None

    def _start(self) -> None:
        import os
        import queue
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so that ``import scale`` works in the child
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = "from scale.grading.verify import _worker_stdio; _worker_stdio()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        replies: queue.Queue = queue.Queue()

        def pump(stream, out):  # one reader thread per child; ends at EOF
            for line in stream:
                out.put(line)
            out.put(None)

        threading.Thread(target=pump, args=(proc.stdout, replies), daemon=True).start()
        self.proc, self.replies = proc, replies
        if self._reply(120.0) is None or self.proc is None:
            code = proc.poll()
            self._stop()
            raise RuntimeError(f"the grading worker process did not start (exit code {code})")

    def _reply(self, timeout_s: float):
        import json
        import queue

        try:
            line = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout"
        return None if line is None else json.loads(line)

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
        self.proc = self.replies = None

    def call(self, pred: str, reference: str, timeout_s: float) -> bool:
        import json

        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._stop()
                self._start()
            try:
                self.proc.stdin.write(json.dumps([pred, reference]) + "\n")
                self.proc.stdin.flush()
            except OSError as err:
                self._stop()
                raise RuntimeError(f"grading worker died: {err!r}") from None
            reply = self._reply(timeout_s)
            if reply == "timeout":
                self._stop()
                raise _GraderTimeout
            if reply is None:
                self._stop()
                raise RuntimeError("grading worker died")
            status, value = reply
            if status == "error":
                raise RuntimeError(value)
            return bool(value)


_WORKER = _Worker()


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def math_verify_equal(pred: str, reference: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""math-verify equivalence of ``pred`` and ``reference`` (both wrapped in ``\boxed{}`` and parsed),
    bounded by ``timeout_s`` seconds (None or <= 0: unbounded). Raises ``TimeoutError`` on overrun.

    >>> math_verify_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")
    True
    """
    if timeout_s is None or timeout_s <= 0:
        return _math_verify_unbounded(pred, reference)
    try:
        if _can_use_signals():
            _math_verify()  # warm-up outside the bound
            return _with_itimer(lambda: _math_verify_unbounded(pred, reference), float(timeout_s))
        return _WORKER.call(pred, reference, float(timeout_s))
    except _GraderTimeout:
        raise TimeoutError(f"math-verify took longer than {timeout_s} s") from None


def _match(pred: str | None, reference: str, timeout_s: float | None) -> tuple[bool, str]:
    if pred is None or not str(pred).strip():
        return False, "none"
    a, b = parse_number(pred), parse_number(reference)
    if a is not None and b is not None:
        if a == b:
            return True, "exact"
        if a.denominator == 1 and b.denominator == 1:
            return False, "exact"
    elif normalize_answer(pred) == normalize_answer(reference):
        return True, "exact"
    try:
        return math_verify_equal(pred, reference, timeout_s=timeout_s), "math_verify"
    except TimeoutError:
        return False, "timeout"
    except Exception:
        return False, "error"


def answers_match(pred: str | None, reference: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""Whether an extracted answer equals the reference (fast exact path, then bounded math-verify).

    >>> answers_match(r"\frac{1}{2}", "0.5"), answers_match("1,234", "1234"), answers_match(None, "7")
    (True, True, False)
    """
    return _match(pred, reference, timeout_s)[0]
