"""Progress for every surface: the engine calls `progress(message, fraction_or_None)`; a face picks how to show it.

- `Bar`: a tqdm.auto bar (a widget in notebooks, text in terminals), shown at once, that ends at 100% when the
  work is done or says "stopped: <reason>" when it is not.
- `Lines`: one line per stage on stderr with the elapsed time (the CLI).
"""
from __future__ import annotations

import sys
import time

from .errors import first_line


class Bar:
    """A progress bar fed by the engine's callback. Use as a context manager: it finishes on exit."""

    def __init__(self, title: str):
        from tqdm.auto import tqdm

        self.title = title
        self.bar = tqdm(total=100, desc=title, bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}]", leave=True)
        self.bar.refresh()

    def __call__(self, message: str, fraction: float | None = None) -> None:
        self.bar.set_description_str(f"{self.title}: {message}"[:80])
        if fraction is not None:
            self.bar.n = max(self.bar.n, int(min(max(fraction, 0.0), 1.0) * 100))
        self.bar.refresh()

    def finish(self, stopped: str | None = None) -> None:
        """100% and the title when done; 'stopped: why' where it is, otherwise."""
        if stopped is None:
            self.bar.n = 100
            self.bar.set_description_str(f"{self.title}: done")
        else:
            self.bar.set_description_str(f"{self.title}: stopped: {stopped}"[:120])
        self.bar.refresh()
        self.bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.finish()
        else:
            self.finish("interrupted" if kind is KeyboardInterrupt else first_line(error, 100)
                        if str(error) else kind.__name__)


class Lines:
    """Progress as lines on a stream: '[  12s  40%] step 1/2: quant=int8'. Repeated messages are printed once."""

    def __init__(self, stream=None):
        self.stream, self.started, self.last = stream or sys.stderr, time.monotonic(), None

    def __call__(self, message: str, fraction: float | None = None) -> None:
        if message == self.last:
            return
        self.last = message
        share = f"{fraction:4.0%}" if fraction is not None else "    "
        print(f"[{time.monotonic() - self.started:5.0f}s {share}] {message}", file=self.stream, flush=True)
