"""Study: every optimize/compare run as a row, with its recipe and parent, kept in an embedded SQLite file.

    >>> study = wb.Study("my-study.sqlite")      # or wb.Study.default(), in the user's data directory
    >>> r = wb.optimize(model, "quant=int8", data=data, study=study)
    >>> study.df[["name", "recipe", "metric", "latency_p50_ms_b1", "speedup_b1", "size_bytes"]]

A row is a `Measurement` (`Measurement.to_row`), its recipe, lineage, notes and environment; `study.measurement(id)`
gives the Measurement back. Rows survive a kernel restart: open the same file again and `study.df` has them.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

DEFAULT_NAME = "study.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent INTEGER REFERENCES runs(id),
    model TEXT,
    recipe TEXT,
    backend TEXT,
    device TEXT,
    metrics TEXT NOT NULL,
    notes TEXT,
    env TEXT
)
"""


class Study:
    """Runs of one exploration. `path=None` keeps them in memory only."""

    _default: "Study | None" = None

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(":memory:" if self.path is None else str(self.path), check_same_thread=False)
        with self._conn:
            self._conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"Study({str(self.path) if self.path else ':memory:'}, {len(self)} runs)"

    @classmethod
    def default(cls) -> "Study":
        """The study `optimize`/`compare` write to unless told otherwise: `$WORKBENCH_STUDY`, or `study.sqlite`
        in the workbench's data directory (`workbench.paths.data_dir`), never the working directory."""
        from .paths import data_dir

        path = Path(os.environ.get("WORKBENCH_STUDY") or data_dir() / DEFAULT_NAME).expanduser().resolve()
        old = Path(".workbench") / "study.sqlite"  # where version 0.1 kept it, in the working directory
        if cls._default is None and not os.environ.get("WORKBENCH_STUDY") and old.is_file():
            import warnings

            warnings.warn(f"runs recorded by workbench 0.1 are in {old.resolve()}; new runs go to {path}. Open the old "
                          f"ones with wb.Study('{old}'), or set WORKBENCH_STUDY={old} to keep using that file",
                          stacklevel=2)
        if cls._default is None or cls._default.path != path:
            cls._default = cls(path)
        return cls._default

    def add(self, name: str, measurement, *, kind: str = "optimize", parent: int | None = None,
            model: str | None = None, recipe: Any = None, notes: list | None = None, env: dict | None = None) -> int:
        """Store one run (a Measurement, or its row); returns its id (use it as a later run's `parent`)."""
        metrics = measurement.to_row() if hasattr(measurement, "to_row") else dict(measurement)
        backend, device = metrics.get("backend"), metrics.get("device")
        recipe_json = recipe.to_json() if hasattr(recipe, "to_json") else json.dumps(recipe) if recipe else None
        with self._conn:
            cur = self._conn.execute(
                "INSERT INTO runs (created, name, kind, parent, model, recipe, backend, device, metrics, notes, env)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), name, kind, parent, model, recipe_json, backend, device,
                 json.dumps(metrics, default=_jsonable), json.dumps(notes or []), json.dumps(env or {})))
        return int(cur.lastrowid)

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def rows(self) -> list[dict]:
        cur = self._conn.execute("SELECT * FROM runs ORDER BY id")
        cols = [c[0] for c in cur.description]
        out = []
        for values in cur.fetchall():
            row = dict(zip(cols, values))
            metrics = json.loads(row.pop("metrics"))
            row["notes"] = json.loads(row["notes"] or "[]")
            row["env"] = json.loads(row["env"] or "{}")
            row["recipe"] = _recipe_string(row["recipe"])
            row.update(metrics)
            out.append(row)
        return out

    @property
    def df(self):
        """All runs as a pandas DataFrame, one row each, indexed by run id."""
        import pandas as pd

        rows = self.rows()
        if not rows:
            return pd.DataFrame(columns=["id", "created", "name", "kind", "parent", "recipe", "metric"]).set_index("id")
        df = pd.DataFrame(rows).set_index("id")
        df["created"] = pd.to_datetime(df["created"], unit="s")
        return df

    def lineage(self, run_id: int) -> list[int]:
        """Ids from the root run down to `run_id`."""
        chain, current = [], run_id
        while current is not None:
            chain.append(current)
            found = self._conn.execute("SELECT parent FROM runs WHERE id = ?", (current,)).fetchone()
            if found is None:
                raise KeyError(f"no run {current} in {self!r}")
            current = found[0]
        return chain[::-1]

    def measurement(self, run_id: int):
        """The Measurement of run `run_id`."""
        from .measure.measurement import Measurement

        found = self._conn.execute("SELECT metrics FROM runs WHERE id = ?", (run_id,)).fetchone()
        if found is None:
            raise KeyError(f"no run {run_id} in {self!r}")
        return Measurement.from_row(json.loads(found[0]))

    def close(self) -> None:
        self._conn.close()


def _recipe_string(recipe_json: str | None) -> str | None:
    if not recipe_json:
        return None
    from .recipe import Recipe

    try:
        return Recipe.from_dict(json.loads(recipe_json)).to_string()
    except Exception:
        return recipe_json


def _jsonable(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
