"""Changes to process-wide state, each confined to a `with` block that restores it, safe with threads.

The workbench runs inside the user's kernel, beside their own code and, for the panel, in a background thread:
it may not leave a logger, stdout, the warning filters, an environment variable or a random generator different
from how it found them. Output it silences is silenced for the calling thread only, and scopes entered by several
threads may end in any order.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings

_lock = threading.RLock()


class _ThisThread(logging.Filter):
    """Drops records below `level` logged from one thread; other threads' records pass."""

    def __init__(self, level: int):
        super().__init__()
        self.thread, self.level = threading.get_ident(), level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= self.level


class _Dispatch:
    """Stands in for sys.stdout (or stderr) while any thread is quiet: writes of quiet threads are dropped, every other
    thread's go to the stream that was there before (all its attributes too)."""

    def __init__(self, real):
        self.real = real

    def write(self, text):
        return len(text) if threading.get_ident() in _quiet_threads else self.real.write(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


_quiet_threads: dict[int, int] = {}  # thread id -> how many quiet() blocks it is in
_installed: dict = {}  # what was replaced while any thread is quiet: the streams, "showwarning"
STREAMS = ("stdout", "stderr")
_shown_before = [warnings.showwarning]  # what showed warnings before the first quiet(); kept by the dispatcher


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Shows a warning unless its thread is quiet. Keeps its own reference to the previous function: a
    `catch_warnings` block of another thread may put this dispatcher back after the last quiet() ended."""
    if threading.get_ident() not in _quiet_threads:
        _shown_before[0](message, category, filename, lineno, file, line)


@contextlib.contextmanager
def quiet(level: int = logging.ERROR):
    """Silence log records below `level`, warnings and prints (to stdout and stderr) of the calling thread:
    libraries' chatter (a failed torch.export prints its whole partial graph to stderr)."""
    me = threading.get_ident()
    drop = _ThisThread(level)
    root = logging.getLogger()
    # loggers that do not pass records up to the root have handlers of their own (torch's write to stderr: a failed
    # torch.export warned with the whole traced graph, thousands of lines)
    apart = [lg for lg in list(logging.Logger.manager.loggerDict.values())
             if isinstance(lg, logging.Logger) and not lg.propagate]
    handlers = [root, *root.handlers, *(h for lg in apart for h in lg.handlers),
                *([logging.lastResort] if logging.lastResort else [])]
    with _lock:
        if not _quiet_threads:  # the first quiet thread installs the dispatchers
            for name in STREAMS:
                _installed[name] = _Dispatch(getattr(sys, name))
                setattr(sys, name, _installed[name])
            if warnings.showwarning is not _show_warning:
                _shown_before[0] = warnings.showwarning
            warnings.showwarning = _show_warning
        _quiet_threads[me] = _quiet_threads.get(me, 0) + 1
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)
        with _lock:
            _quiet_threads[me] -= 1
            if not _quiet_threads[me]:
                del _quiet_threads[me]
            if not _quiet_threads:  # the last one out restores what it can (a later replacement is left alone)
                for name in STREAMS:
                    if getattr(sys, name) is _installed.get(name):
                        setattr(sys, name, _installed[name].real)
                if warnings.showwarning is _show_warning:
                    warnings.showwarning = _shown_before[0]
                _installed.clear()


_levels: dict[str, list] = {}  # logger name -> [(token, level)] of the scopes in force, oldest first


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """`logging.getLogger(name)` at `level` inside the block; concurrent scopes may end in any order, and the
    logger's own level comes back when the last one does."""
    logger, token = logging.getLogger(name), object()
    with _lock:
        stack = _levels.setdefault(name, [])
        if not stack:
            stack.append((None, logger.level))  # what was there before any scope
        stack.append((token, level))
        logger.setLevel(level)
    try:
        yield logger
    finally:
        with _lock:
            stack[:] = [(t, lv) for t, lv in stack if t is not token]
            logger.setLevel(stack[-1][1])
            if len(stack) == 1:
                del _levels[name]


_layer_by_layer = [0, True]  # scopes open, the fast-path setting the first found


@contextlib.contextmanager
def layer_by_layer():
    """torch's fused transformer fast path off (`torch.backends.mha`) inside the block: for passes whose hooks
    read a layer's inputs (with a padding mask, nn.TransformerEncoder hands its layers nested tensors, its rows
    without their padding, which have no shape to read), and for graph exporters (the fused layers have no ONNX
    translation). The setting is torch's, process-wide: the user's is back when the last scope of any thread
    ends (one they set meanwhile is not kept), and other threads' models run unfused until then."""
    from torch.backends import mha

    with _lock:
        if not _layer_by_layer[0]:
            _layer_by_layer[1] = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
        _layer_by_layer[0] += 1
    try:
        yield
    finally:
        with _lock:
            _layer_by_layer[0] -= 1
            if not _layer_by_layer[0]:
                mha.set_fastpath_enabled(_layer_by_layer[1])


@contextlib.contextmanager
def environ(**values: str):
    """Environment variables set inside the block, restored (or removed) after (for one thread at a time: the
    environment is the process's)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class DeadlineExceeded(TimeoutError):
    """A `deadline` block ran past its time."""


class _Expired(BaseException):  # a BaseException, so that an `except Exception` in the block cannot swallow it
    pass


@contextlib.contextmanager
def deadline(seconds: float, again_every: float = 1.0):
    """Raise DeadlineExceeded in this thread when the block is still running after `seconds`: checked between
    Python bytecodes, so a loop in Python code (a third-party library's that never ends) stops; a long call into C
    stops when it returns. Raised again every `again_every` seconds until the block ends (a bare `except:` in the
    block may swallow one). Nothing is raised after the block ends, and an exception the block raises itself wins.
    Not for nesting; and an interrupted library may be left in whatever state it was in (as with Ctrl-C)."""
    import ctypes

    expired = type("Expired", (_Expired,), {})  # this block's own: another's cannot be mistaken for it
    ident, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def fire():
        with lock:
            if state["done"]:
                return
            state["fired"] = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(expired))
            arm(again_every)

    def arm(after: float):
        state["timer"] = threading.Timer(after, fire)
        state["timer"].daemon = True
        state["timer"].start()

    def stop():
        with lock:
            state["done"] = True
            state["timer"].cancel()
            if state["fired"]:  # one fired but not yet raised: cleared
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)

    arm(seconds)
    outcome = None
    try:
        try:
            yield
        except BaseException as e:  # every way out of the block passes through stop()
            outcome = e
    except expired:  # fired as the block ended
        pass
    while True:
        try:
            stop()
            break
        except expired:  # raised while stopping: stop again (nothing fires once done)
            continue
    if isinstance(outcome, expired):
        raise DeadlineExceeded(f"still running after {seconds:g} s") from None
    if outcome is not None:
        raise outcome


__all__ = ["quiet", "logger_level", "environ", "deadline", "DeadlineExceeded"]
