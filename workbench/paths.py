"""Where the workbench keeps things on disk, never in the working directory unless told to.

- cache (`$WORKBENCH_CACHE`, default `~/.cache/workbench`): trained built-ins, reference embeddings.
- data (`$WORKBENCH_DATA`, default `$XDG_DATA_HOME/workbench` or `~/.local/share/workbench`): the default Study and
  autotune's default search storage.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    base = os.environ.get("WORKBENCH_DATA") or Path(os.environ.get("XDG_DATA_HOME") or
                                                    Path.home() / ".local" / "share") / "workbench"
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
