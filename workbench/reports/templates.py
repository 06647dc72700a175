"""The report templates (papermill notebooks, package data in `workbench/reports/templates/`): finding them, and
reading and checking their parameters before anything runs."""
from __future__ import annotations

from pathlib import Path

from ..errors import ReportError

TEMPLATES = Path(__file__).resolve().parent / "templates"
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple),
          "dict": (dict,)}


def template_path(template: str | Path) -> Path:
    """A template by name ('quickstart') or path ('my.ipynb')."""
    path = Path(template)
    if path.suffix != ".ipynb":
        path = TEMPLATES / f"{template}.ipynb"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.ipynb"))) if TEMPLATES.exists() else "none"
        raise ReportError(f"no template {str(template)!r}; templates: {known}")
    return path


def inspect_template(path: Path) -> dict:
    """{parameter: {"type", "default", "help"}} from the cell tagged `parameters`.

    Parsed with Python's ast rather than papermill's inspect, which skips every line holding more than one '='
    (so a default like ["quant=int8"] would vanish). The type is the annotation (`name: int = 3`).
    """
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ReportError(f"template {path.name} has no cell tagged 'parameters'")
    lines = cell.source.splitlines()
    out = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, kind = node.target.id, ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name, kind = node.targets[0].id, "None"
        else:
            continue
        line = lines[node.end_lineno - 1]
        comment = line[node.end_col_offset:].strip()
        out[name] = {"type": kind, "default": ast.unparse(node.value) if node.value else None,
                     "help": comment.lstrip("#").strip()}
    return out


def templates() -> dict:
    """{template name: {parameter: {"type", "default", "help"}}} for every template."""
    return {path.stem: inspect_template(path) for path in sorted(TEMPLATES.glob("*.ipynb"))}


def check_parameters(template: Path, parameters: dict) -> dict:
    """Refuse parameters the template does not declare, and values of the wrong type."""
    if not isinstance(parameters, dict):
        raise ReportError(f"report parameters must be a mapping of names to values, got {type(parameters).__name__}")
    declared = inspect_template(template)
    unknown = [n for n in parameters if n not in declared]
    if unknown:
        raise ReportError(f"template {template.stem!r} has no parameter {', '.join(map(repr, unknown))}; its "
                          f"parameters are: {', '.join(declared)}")
    for name, value in parameters.items():
        kind = declared[name]["type"]
        allowed = _TYPES.get(kind)
        if allowed and value is not None and (not isinstance(value, allowed) or
                                              (kind in ("int", "float") and isinstance(value, bool))):
            article = "an" if kind[0] in "aeiou" else "a"
            raise ReportError(f"parameter {name!r} of {template.stem!r} takes {article} {kind} (default "
                              f"{declared[name]['default']}), got {type(value).__name__} {value!r}")
    return parameters
