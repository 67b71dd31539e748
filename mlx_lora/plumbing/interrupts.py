"""How training meets Ctrl-C and SIGTERM: both stop it the same way (a checkpoint, then a clean
return), never in the middle of a step.

Python handles signals only in the main thread, so in any other thread both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time


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
    """Make Ctrl-C raise KeyboardInterrupt in the main thread inside the block, always and at once.

    Two things stand in the way in an interactive command that reads the terminal (the chat):

    - A process started from a script in the background (``cmd &`` without job control, and so
      many test and CI runners) inherits SIGINT as *ignored*, and Python then installs no handler
      of its own: Ctrl-C would do nothing.
    - Python runs a signal's handler only when the main thread looks for it, after a blocking call
      returns with EINTR. A SIGINT that the kernel hands to another thread (the generation
      engine's), or that lands between ``input()`` printing its prompt and blocking in
      ``select()`` (a loaded machine, a user quick on the keys), only marks the handler as
      pending, and the prompt would wait for another key.

    So SIGINT gets a handler that raises KeyboardInterrupt, and a watcher thread, woken through
    the signal wake-up pipe, nudges the main thread with SIGUSR1 until that handler has run: the
    nudge's handler is a no-op in C (a Python one would be called where Python checks for
    signals, also while the KeyboardInterrupt is being raised, which Python refuses), so its only
    effect is that the main thread's blocking call returns with EINTR and Python runs the pending
    SIGINT handler. Batch commands keep what they inherited."""
    if not _main_thread() or os.name != "posix":
        yield
        return
    delivered = [0]  # a plain counter: a handler must not take a lock the code it interrupted holds

    def on_sigint(signum, frame):
        delivered[0] += 1
        raise KeyboardInterrupt

    previous_int = signal.signal(signal.SIGINT, on_sigint)
    previous_usr1 = signal.getsignal(signal.SIGUSR1)
    nudge = _install_noop_handler(signal.SIGUSR1)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    stop_read, stop_write = os.pipe()
    previous_fd = None
    if nudge:
        try:
            previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:
            previous_fd = None
    stopping = [False]
    main = threading.main_thread().ident

    def watch() -> None:
        while not stopping[0]:
            before = delivered[0]
            ready, _, _ = select.select([read_fd, stop_read], [], [])
            if stop_read in ready:
                return
            got = os.read(read_fd, 512)
            if previous_fd not in (None, -1):
                with contextlib.suppress(OSError):
                    os.write(previous_fd, got)
            if signal.SIGINT not in got:
                continue
            # Until the handler has run. Nudges are harmless (a no-op, and Python retries what
            # EINTR cut short), so when a handler ran before this wake-up was read, a bounded
            # number of spare ones is the price of never missing one.
            pause = 0.002
            for _ in range(200):
                if stopping[0] or delivered[0] != before:
                    break
                with contextlib.suppress(OSError):
                    signal.pthread_kill(main, signal.SIGUSR1)
                time.sleep(pause)  # a back-off between nudges, not a wait for an outcome
                pause = min(pause * 2, 0.25)

    watcher = threading.Thread(target=watch, name="ctrl-c-watcher", daemon=True)
    if previous_fd is not None:
        watcher.start()
    try:
        yield
    finally:
        # SIGINT's own handler back first (a Ctrl-C from here on is the caller's); SIGUSR1's only
        # once the watcher has stopped, as its default action would end the process.
        stopping[0] = True
        signal.signal(signal.SIGINT, previous_int)
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
            os.write(stop_write, b"x")
            watcher.join()
        signal.signal(signal.SIGUSR1, previous_usr1 if previous_usr1 is not None else signal.SIG_DFL)
        for fd in (read_fd, write_fd, stop_read, stop_write):
            os.close(fd)


def _install_noop_handler(signum: int) -> bool:
    """Give ``signum`` a handler in C that does nothing, and that interrupts blocking calls.

    The C library's ``abs`` serves: it takes an int, as a handler does, touches no memory and is
    safe in a signal handler. False where the C library cannot be reached (no nudges then)."""
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        handler = ctypes.cast(libc.abs, ctypes.c_void_p).value
        if libc.signal(signum, handler) == ctypes.c_void_p(-1).value:  # SIG_ERR
            return False
        signal.siginterrupt(signum, True)
        return True
    except (OSError, AttributeError, ValueError):
        return False


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
