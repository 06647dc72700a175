"""The notebook face: magics (`%optimize`, `%%recipe`, `%compare`, `%profile`), the result card, the control panel
and the per-layer map. Thin: they parse, resolve names in the notebook and call the engine."""
from __future__ import annotations


def load_ipython_extension(ipython) -> None:
    """`%load_ext workbench`: registers the magics (idempotent, fast: torch loads when a magic runs)."""
    from .magics import WorkbenchMagics, refresh_help

    refresh_help()
    ipython.register_magics(WorkbenchMagics)
