"""Changes to process-wide state, each confined to a `with` block that restores it.

The workbench runs inside the user's kernel, beside their own code and, for the panel, in a background thread:
it may not leave a logger, stdout, an environment variable or a random generator different from how it found
them. Output it silences is silenced for the calling thread only.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import warnings


class _ThisThread(logging.Filter):
    """Drops records below `level` logged from one thread; other threads' records pass."""

    def __init__(self, level: int):
        super().__init__()
        self.thread, self.level = threading.get_ident(), level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= self.level


class _ThreadStdout(io.TextIOBase):
    """Writes from one thread go to a sink; every other thread's go to the real stream."""

    def __init__(self, real, thread: int):
        self.real, self.thread, self.sink = real, thread, io.StringIO()

    def write(self, text):
        return (self.sink if threading.get_ident() == self.thread else self.real).write(text)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def quiet(level: int = logging.ERROR):
    """Silence log records below `level`, warnings and prints of the calling thread (libraries' chatter)."""
    drop = _ThisThread(level)
    root = logging.getLogger()
    handlers = [root, *root.handlers, *([logging.lastResort] if logging.lastResort else [])]
    for h in handlers:
        h.addFilter(drop)
    real = sys.stdout
    proxy = _ThreadStdout(real, threading.get_ident())
    sys.stdout = proxy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if sys.stdout is proxy:  # another scope may have replaced it meanwhile; then leave theirs alone
            sys.stdout = real
        for h in handlers:
            h.removeFilter(drop)


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """`logging.getLogger(name)` at `level` inside the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def environ(**values: str):
    """Environment variables set inside the block, restored (or removed) after."""
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
