"""How training meets Ctrl-C and SIGTERM: both stop it the same way (a checkpoint, then a clean
return), never in the middle of a step.

Python handles signals only in the main thread, so in any other thread both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Handle SIGTERM (a job scheduler, `kill`) like Ctrl-C inside the block: it raises
    KeyboardInterrupt, which the trainer answers by saving a checkpoint, instead of dying mid-step."""
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ctrl_c_on_terminal():
    """Make Ctrl-C raise KeyboardInterrupt inside the block even when SIGINT was ignored at start.

    A process started from a script in the background (``cmd &`` without job control, and so many
    test and CI runners) inherits SIGINT as *ignored*, and Python then installs no handler of its
    own: Ctrl-C typed into an interactive command that reads the terminal would do nothing. Only
    for commands that own the terminal (the chat's prompt); batch commands keep what they inherited."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupts_deferred(enabled: bool = True):
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them as they would have been.

    An optimizer step changes the weights, the optimizer state and the step counter; an
    interrupt between those changes would save a checkpoint whose parts disagree (the weights
    of step N+1 labelled step N), and the resumed run would diverge. When ``enabled`` is false
    this does nothing."""
    if not enabled or not _main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif signum == signal.SIGINT and handler == signal.default_int_handler:
                raise KeyboardInterrupt
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), signum)  # the default action, now that the step is whole
