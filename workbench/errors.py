"""Errors a user can act on: each message says what went wrong and what to do."""


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class RecipeError(WorkbenchError, ValueError):
    """A recipe or step has an unknown name or a value out of range."""


class DataError(WorkbenchError, ValueError):
    """The data bundle cannot be used: empty loader, bad metric, NaN results."""


class ModelError(WorkbenchError, TypeError):
    """The model is not a torch module, or its forward fails on the data."""


class ExportError(WorkbenchError, RuntimeError):
    """Export to ONNX failed or the exported graph disagrees with the torch model."""


class StepError(WorkbenchError, RuntimeError):
    """A recipe step failed on this model or data in a way the step does not foresee; the message names the step
    and the library's error (the full traceback is chained)."""


class DeviceError(WorkbenchError, RuntimeError):
    """The requested device or backend is not available on this machine."""


class PickleFallback(UserWarning):
    """A model was saved as a pickle because its backend's safe format could not hold it."""


class ReportError(WorkbenchError):
    """A report could not be made; the message says why (the notebook and HTML are still written)."""


class MissingExtra(WorkbenchError, ImportError):
    """An optional part of the workbench needs a package that is not installed; the message names the extra."""


def require(module: str, extra: str, what: str):
    """Import `module`, or raise MissingExtra naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}: pip install 'workbench[{extra}]'") from None


def first_line(error: BaseException, limit: int | None = None, named: bool = False) -> str:
    """The first line of an exception's message (its type's name where the message is empty), cut at `limit`
    characters; `named` puts the type's name in front ("ValueError: ..."). One line is what the workbench shows of
    a library's error; the whole traceback stays on the exception's chain."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ("" if named else type(error).__name__)
    out = f"{type(error).__name__}: {line}" if named else line
    return out[:limit] if limit else out
