"""Reproducible reports: papermill templates run with parameters, then nbconvert to HTML with the code hidden.

    >>> wb.report("quickstart", {"model": "digits-mlp"}, html="out.html")
    >>> wb.reports.batch("grid.yaml", workers=2)
    >>> wb.reports.from_study(wb.Study.default(), "explored.html")

Templates ship inside the package (`workbench/reports/templates/`, built by `tools/build_templates.py`); a bare name
like "quickstart" resolves there. The CLI (`workbench report`, `workbench batch`) calls these same functions.
"""
from ..errors import ReportError  # noqa: F401
from .batch import batch, expand_batch, run_one, write_index  # noqa: F401
from .cells import (comparison, environment_table, generation, headline, labels_only, load_model,  # noqa: F401
                    read_headline, run_recipes, show, show_parameters, verdicts)
from .run import from_study, report, to_html  # noqa: F401
from .templates import TEMPLATES, check_parameters, inspect_template, template_path, templates  # noqa: F401
