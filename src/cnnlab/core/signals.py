"""SIGINT and SIGTERM during a command: stop at once, or at the next safe point.

A command runs under `handled()`: a signal raises `Interrupted` where the code is, as Ctrl-C
raises KeyboardInterrupt, so setting up (scanning, caching) stops at once and leaves what it had
written whole (every file goes through an atomic write). Inside `deferred()` the signal is only
recorded: training checks `requested()` after each step and checkpoints, the final evaluation
and report finish, and the run then calls `raise_if_requested()`; a second signal while deferring
stops at once. Either way the process exits 128 + the signal's number (130 for SIGINT, 143 for
SIGTERM). Signal handlers are process-wide, and so is this state.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "deferring": 0, "received": 0}


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal. A KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, run_dir=None):
        self.name = signal.Signals(signum).name
        super().__init__(self.name)
        self.signum = signum
        self.run_dir = run_dir  # the run folder that `cnnlab train --resume` continues, if there is one

    def __reduce__(self):  # pickled by signal number (a worker process may raise it)
        return Interrupted, (self.signum, self.run_dir)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handle(signum, frame) -> None:
    again = bool(_state["received"])
    _state["received"] = _state["received"] or signum
    if not _state["deferring"] or again:  # a second signal does not wait for the safe point
        raise Interrupted(signum)


@contextlib.contextmanager
def handled():
    """Route SIGINT and SIGTERM to `Interrupted` for the duration (a no-op outside the main thread).

    Nested uses (a study's runs inside the CLI's) share the outermost one's handlers and state.
    """
    if threading.current_thread() is not threading.main_thread() or _state["depth"]:
        yield  # not the main thread, or an outer command already handles them
        return
    old = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    _state.update(depth=1, deferring=0, received=0)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _state.update(depth=0, deferring=0, received=0)


def ignore_in_worker() -> None:
    """A pool worker's initializer: the parent alone reacts to a signal (a terminal's reaches them all)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def deferred():
    """Record signals instead of raising them; the caller checks `requested()` and ends cleanly."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1


def requested() -> int:
    """The signal received so far (0 for none)."""
    return _state["received"]


def raise_if_requested(run_dir=None) -> None:
    if _state["received"]:
        raise Interrupted(_state["received"], run_dir)
