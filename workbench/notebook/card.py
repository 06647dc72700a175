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

    def _deploy(self) -> tuple[str, list[str]]:
        """(what to say, the lines that load and run the deployable file without the workbench)."""
        try:
            lines = self.result.deploy
        except Exception:  # a model no backend claims (the card still shows the rest)
            return "", []
        if not lines:
            return "", []
        r = self.result
        head = f"deployable file: {r.exported}" if r.exported else \
            f"deploy: result.export('{next(x for x in lines if chr(39) in x).split(chr(39))[1]}') writes the " \
            "deployable file; then"
        return head, lines

    def __repr__(self) -> str:
        table = self._table().to_string()
        checks = "".join(f"\n! pre-flight: {n}" for n in self.result.preflight)
        notes = "".join(f"\n- {n}" for n in self.result.notes)
        head, lines = self._deploy()
        deploy = f"\n{head}\n" + "\n".join(f"    {line}" for line in lines) if lines else ""
        gen = self._generation()
        gen = f"\n{gen}" if isinstance(gen, str) else \
            f"\n{self._generation_title()}\n{gen.to_string()}" if gen is not None else ""
        return f"{self._title()}\n{self.result.verdict}\n{table}{gen}{checks}{notes}{deploy}"

    def _generation(self):
        """The generation table, or the line saying why generation was not timed (None for other models)."""
        from ..tables import generation_table

        table = generation_table(self.result.baseline, self.result.measurement)
        g = self.result.measurement.generation
        return table if table is not None or g is None else g.lines()[0]

    def _generation_title(self) -> str:
        g = self.result.measurement.generation
        same = f"; {g.agreement()}" if g.same_tokens is not None else ""
        return f"generation: greedy, {g.new_tokens} new tokens, cache on{same}"

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.notes)
        checks = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.preflight)
        checks = f"<p><b>pre-flight</b> (will this be faster here?)</p><ul>{checks}</ul>" if checks else ""
        table = self._table().to_html(classes="wb-table", border=0)
        gen = self._generation()
        gen = f"<p class='wb-generation'>{html.escape(gen)}</p>" if isinstance(gen, str) else \
            (f"<p class='wb-generation'>{html.escape(self._generation_title())}</p>"
             f"<div style='overflow-x:auto'>{gen.to_html(classes='wb-table', border=0)}</div>") \
            if gen is not None else ""
        return (f"<div class='wb-card'><b>{html.escape(self._title())}</b>"
                f"<p class='wb-verdict'>{html.escape(self.result.verdict)}</p>"
                f"<div style='overflow-x:auto'>{table}</div>{gen}{checks}{f'<ul>{notes}</ul>' if notes else ''}"
                f"{self._deploy_html()}</div>")

    def _deploy_html(self) -> str:
        head, lines = self._deploy()
        if not lines:
            return ""
        code = html.escape("\n".join(lines))
        return f"<p class='wb-deploy'>{html.escape(head)}</p><pre class='wb-deploy-code'>{code}</pre>"
