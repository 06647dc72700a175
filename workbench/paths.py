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


def disk_error(path, e: OSError) -> str:
    """One line for a failed write: the path and the cause ('No space left on device', 'Permission denied')."""
    return f"cannot write {path}: {e.strerror or e}"


def check_parents(path) -> None:
    """One clear line when a directory on the way to `path` is a file (mkdir would say only 'File exists')."""
    from .errors import WorkbenchError

    blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise WorkbenchError(f"cannot write {path}: {blocking} is a file, not a directory")


def write_atomic(path, data: str | bytes) -> Path:
    """Write a file whole or not at all: into a temporary name beside it, flushed to disk, then renamed over `path`.
    A full disk or a crash leaves the previous file (or none), never half of the new one."""
    import tempfile

    from .errors import WorkbenchError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WorkbenchError(disk_error(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WorkbenchError(disk_error(path, e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_directory(staged: Path, final: Path) -> Path:
    """Put a fully written directory in place of `final` (renames only, on the same file system): the old one is
    set aside, the new one renamed in, then the old one removed."""
    import shutil

    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
