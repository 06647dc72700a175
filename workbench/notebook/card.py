"""The result card a notebook shows: the verdict first, the table (2-3 significant figures, speedups with their
95% interval), the pre-flight lines and the engine's notes; as text and as HTML."""
from __future__ import annotations

import html


class Card:
    def __init__(self, result, name: str | None = None):
        self.result, self.name = result, name

    def _title(self) -> str:
        r = self.result
        where = f" -> {self.name}" if self.name else ""
        return f"{r.name} on {r.device} ({r.backend}){where}"

    def _table(self):
        from ..tables import display_table

        return display_table(self.result.table())

    def __repr__(self) -> str:
        table = self._table().to_string()
        checks = "".join(f"\n! pre-flight: {n}" for n in self.result.preflight)
        notes = "".join(f"\n- {n}" for n in self.result.notes)
        return f"{self._title()}\n{self.result.verdict}\n{table}{checks}{notes}"

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.notes)
        checks = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.preflight)
        checks = f"<p><b>pre-flight</b> (will this be faster here?)</p><ul>{checks}</ul>" if checks else ""
        table = self._table().to_html(classes="wb-table", border=0)
        return (f"<div class='wb-card'><b>{html.escape(self._title())}</b>"
                f"<p class='wb-verdict'>{html.escape(self.result.verdict)}</p>"
                f"<div style='overflow-x:auto'>{table}</div>{checks}{f'<ul>{notes}</ul>' if notes else ''}</div>")
