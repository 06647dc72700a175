"""Where the workbench keeps things on disk, never in the working directory unless told to.

- cache (`$WORKBENCH_CACHE`, default `~/.cache/workbench`): trained built-ins, reference embeddings.
- data (`$WORKBENCH_DATA`, default `$XDG_DATA_HOME/workbench` or `~/.local/share/workbench`): the default Study and
  autotune's default search storage.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable(path, directory: bool = False) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (0600/0700) the permissions a plain open()/mkdir()
    would have (0666/0777 less the umask), so saves and reports stay readable by whoever could read before."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_directory(path) -> None:
    """Make a rename inside `path` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        readable(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WorkbenchError(disk_error(path, e)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it: for a write that another library makes and that a
    KeyboardInterrupt in the middle would leave broken (optuna's journal lock turns one into a FileNotFoundError and
    leaves its lock file behind). Outside the main thread, where signals cannot be caught, the block runs as is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:  # None: the previous handler was not installed from Python; Python's own is the closest
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if caught:
        raise KeyboardInterrupt


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(staged: Path, final: Path) -> Path:
    """Put a fully written directory in place of `final`. On Linux the two are exchanged in one atomic step, so
    at every moment `final` is the whole old save or the whole new one; elsewhere the old one is renamed aside
    first (a crash between the two renames leaves it as `.NAME.old-PID`, which `wb.load` points at)."""
    import shutil

    if final.exists():
        if _exchange(staged, final):  # staged now holds the old save
            fsync_directory(final.parent)
            shutil.rmtree(staged, ignore_errors=True)
            return final
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        try:
            os.replace(staged, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    fsync_directory(final.parent)
    return final
