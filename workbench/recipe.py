"""Recipes: an ordered list of small validated steps that round-trips through dict, YAML and a short string.

    >>> from workbench import Recipe, Prune, Quantize
    >>> r = Recipe([Prune(0.5, structured=True), Quantize("int8")])
    >>> Recipe.parse("prune=0.5:structured=true,quant=int8") == r
    True

A step is a dataclass whose fields carry their own rules (`option(...)`): validation, the short form, the magic's
and CLI's flags, the panel's controls and sweep grids are all derived from them, so a new technique declares its
fields once. Steps themselves live beside their handlers in `workbench/techniques/`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from . import registry
from .errors import RecipeError


# -- fields that validate themselves ---------------------------------------------------------------------------
def option(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, integer: bool = False,
           optional: bool = False, names: bool = False, module: str | None = None, flag: str | None = None,
           ui: tuple | None = None, excludes: bool = False, help: str = ""):
    """A step field with its rules.

    choices: allowed values. low/high (open or closed), integer: a number in range; optional: None allowed too.
    names: layer names (a string or a tuple of strings, stored as a tuple). module: a torch module, a name or None
        (the value is a regex a string spec must match when it holds '='). flag: an extra command-line flag that
        sets this field (e.g. '--structured'). ui: (low, high, step) for the panel's slider. excludes: layer names
        this step leaves alone (the layer map fills them). help: one line.
    """
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "integer": integer, "optional": optional, "names": names, "module": module, "flag": flag, "ui": ui,
            "excludes": excludes, "help": help}
    if names:
        return field(default=tuple(default) if default is not dataclasses.MISSING else (), metadata=meta)
    return field(default=default, metadata=meta)


def _check_field(step: str, f, value: Any) -> Any:
    meta = f.metadata
    name = f"{step}.{f.name}"
    if not meta:
        return value
    if meta["names"]:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{name}: expected layer names (strings), got {value!r}")
        return tuple(value)
    if value is None and meta["optional"]:
        return value
    if meta["module"] is not None:
        if value is None or hasattr(value, "parameters"):
            return value
        if not isinstance(value, str):
            raise RecipeError(f"{name}: expected a torch module, a name or None, got {type(value).__name__}")
        if meta["module"] and "=" in value and not re.fullmatch(meta["module"], value):
            raise RecipeError(f"{name}: {value!r} is not a spec; use e.g. 'width=0.5' or 'depth=0.5'")
        return value
    if meta["choices"] is not None:
        if not any(value is c or (value == c and type(value) is type(c)) for c in meta["choices"]):
            raise RecipeError(f"{name}: {value!r} is not allowed; choose one of "
                              f"{', '.join(map(_fmt_choice, meta['choices']))}")
        return value
    if meta["low"] is not None or meta["high"] is not None or meta["integer"]:
        kind = int if meta["integer"] else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RecipeError(f"{name}: expected {'an integer' if meta['integer'] else 'a number'}, got {value!r}")
        lo, hi = meta["low"], meta["high"]
        below = lo is not None and (value <= lo if meta["low_open"] else value < lo)
        above = hi is not None and (value >= hi if meta["high_open"] else value > hi)
        if below or above or value != value:  # NaN is out of every range
            interval = f"{'(' if meta['low_open'] else '['}{lo}, {hi}{')' if meta['high_open'] else ']'}"
            raise RecipeError(f"{name}: {value!r} is out of range; allowed {interval}")
    return value


def _fmt_choice(value: Any) -> str:
    return "None" if value is None else repr(value)


def spec_of(f) -> dict:
    """The rules of a step field, for faces that build controls or flags from them."""
    return dict(f.metadata) if f.metadata else {}


@dataclass
class Step:
    """Base of all steps. A subclass sets `kind` (its type in dicts and YAML), `short` (its key in the short form
    and its flag), `main_field` (what `short=value` sets), optionally `aliases`, `stage` and `colour`.

    stage orders steps that must come in a given order: 0 changes or trains the torch model, 1 rewrites it for
    inference only, 2 lowers it to a runtime form (int8, fp16). A step may not follow one of a higher stage.
    """

    kind: ClassVar[str] = ""
    short: ClassVar[str] = ""
    main_field: ClassVar[str] = ""
    aliases: ClassVar[tuple] = ()
    stage: ClassVar[int] = 0
    stage_note: ClassVar[str] = ""  # why nothing of a lower stage may follow this step
    colour: ClassVar[str | None] = None

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _check_field(type(self).__name__, f, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Cross-field rules and normalisation (after each field passed its own rules)."""

    @property
    def needs_train(self) -> bool:
        """Whether this step reads the data's train split (calibration, gradients, training)."""
        return False

    @property
    def reads_train(self) -> bool:
        """Whether this step reads the train split where there is one (more than those that need it)."""
        return self.needs_train

    def precisions(self) -> tuple:
        """For a step that lowers the model: the precisions any of which would do (empty for other steps)."""
        return ()

    def to_dict(self) -> dict:
        out = {"type": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "parameters"):  # a module given in Python is named, not serialized
                value = f"<{type(value).__name__} module>"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        if not isinstance(d, dict):
            raise RecipeError(f"a step must be a mapping with a 'type', got {d!r}")
        d = dict(d)
        kind = d.pop("type", None) or cls.kind
        step_cls = _by_name(str(kind), "step type")
        known = {f.name for f in fields(step_cls)}
        unknown = set(map(str, d)) - known
        if unknown:
            raise RecipeError(
                f"{step_cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"fields are: {', '.join(sorted(known))}")
        try:
            return step_cls(**d)
        except TypeError as e:  # odd constructor arguments
            raise RecipeError(f"{step_cls.__name__}: {e}") from None

    def describe(self) -> str:
        """Short form of this step, e.g. 'quant=int8' or 'prune=0.5:structured=true'."""
        main = getattr(self, self.main_field) if self.main_field else None
        parts = [self.short if main is None or main is True else f"{self.short}={_fmt(main)}"]
        for f in fields(self):
            if f.name == self.main_field:
                continue
            value = getattr(self, f.name)
            if value != _default(f) and _short_ok(value):
                parts.append(f"{f.name}={_fmt(value)}")
        return ":".join(parts)


def _default(f) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "+".join(value)
    return str(value)


def _short_ok(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, tuple))


def _by_name(name: str, what: str = "step") -> type:
    """A step class by its type, its short name or an alias."""
    name = name.strip().lower()
    for cls in registry.step_types().values():
        if name in (cls.kind, cls.short, *cls.aliases):
            return cls
    if what == "step type":
        known = ", ".join(cls.kind for cls in registry.step_types().values())
        raise RecipeError(f"unknown step type {name!r}; known steps: {known}")
    known = ", ".join(cls.short for cls in registry.step_types().values())
    raise RecipeError(f"unknown step {name!r}; known: {known} (e.g. 'prune=0.5,quant=int8')")


# -- the short form ---------------------------------------------------------------------------------------------
def _parse_scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if "+" in text:
        return tuple(text.split("+"))
    return text


def parse_step(item: str) -> Step:
    """One step from its short form: 'quant=int8-static:calibration=entropy', 'unpad', 'prune=0.5'."""
    head, *options = item.strip().split(":")
    key, eq, value = head.partition("=")
    try:
        cls = _by_name(key)
    except RecipeError:
        known = ", ".join(c.short for c in registry.step_types().values())
        raise RecipeError(f"unknown step {key.strip().lower()!r} in {item!r}; known: {known} "
                          "(e.g. 'prune=0.5,quant=int8')") from None
    kwargs: dict[str, Any] = {}
    if eq:
        if not cls.main_field:
            raise RecipeError(f"{cls.__name__} takes no value: write {cls.short!r}")
        kwargs[cls.main_field] = _parse_scalar(value.strip())
    for opt in options:
        name, eq2, val = opt.partition("=")
        if not eq2:
            raise RecipeError(f"{cls.__name__}: option {opt!r} in {item!r} should look like name=value")
        kwargs[name.strip()] = _parse_scalar(val.strip())
    return Step.from_dict({"type": cls.kind, **kwargs})


def _parse_short(text: str) -> list[Step]:
    steps = [parse_step(item) for item in text.split(",") if item.strip()]
    if not steps:
        raise RecipeError(f"empty recipe {text!r}; e.g. 'quant=int8' or 'prune=0.5,quant=int8'")
    return steps


# -- flags: what %optimize, the CLI, the panel and sweep grids set ---------------------------------------------
def flag_fields() -> dict[str, tuple[type, Any]]:
    """{flag key: (Step class, field)} for every extra flag a step field declares (e.g. 'structured')."""
    out = {}
    for cls in registry.step_types().values():
        for f in fields(cls):
            flag = f.metadata.get("flag") if f.metadata else None
            if flag:
                out[flag.lstrip("-").replace("-", "_")] = (cls, f)
    return out


def flag_keys() -> list[str]:
    """Every key `from_flags` and sweep grids take: each technique's short name, then the extra flags."""
    return [cls.short for cls in registry.step_types().values()] + list(flag_fields())


def from_flags(order: list[str] | None = None, **flags: Any) -> dict:
    """The recipe dict for command-line style flags (`%optimize`, the CLI, the panel, sweep grids).

    A technique's key (`quant="int8"`, `prune=0.5`, `unpad=True`) adds its step: True for the defaults, a value
    for its main field, or a value with options ('int8-static:calibration=entropy'); None or False leaves it out.
    Extra flags (`structured=True`, `epochs=4`) set a field of their technique's step, which must be there.
    Steps follow `order` (the order the flags were given), then their stage: inference rewrites and
    quantization come last, whatever the order.
    """
    types = {cls.short: cls for cls in registry.step_types().values()}
    extras = flag_fields()
    unknown = [k for k in flags if k not in types and k not in extras]
    if unknown:
        raise RecipeError(f"unknown flag(s) {', '.join(sorted(unknown))}; flags are: {', '.join(flag_keys())}")
    steps: dict[str, Step] = {}
    given = [k for k in (order or []) if k in types] + [k for k in types if k not in (order or [])]
    for key in given:
        value = flags.get(key)
        if value is None or value is False:
            continue
        steps[key] = parse_step(key if value is True else f"{key}={value}")
    for key, (cls, f) in extras.items():
        value = flags.get(key)
        if value is None or value is False:
            continue
        if cls.short not in steps:
            raise RecipeError(f"--{key.replace('_', '-')} needs --{cls.short}")
        steps[cls.short] = dataclasses.replace(steps[cls.short], **{f.name: value})
    if not steps:
        raise RecipeError("nothing to do: give at least one of "
                          + ", ".join(f"--{k}" for k in types) + ", or --recipe")
    ordered = sorted(steps.values(), key=lambda s: s.stage)  # stable: the given order within a stage
    return {"steps": [s.to_dict() | _modules(s) for s in ordered]}


def _describe_field(f) -> str:
    meta = f.metadata or {}
    if meta.get("choices") and meta["choices"] != (True, False):
        return ", ".join(map(_fmt_choice, meta["choices"]))
    if meta.get("low") is not None or meta.get("high") is not None:
        lo = "(" if meta["low_open"] else "["
        hi = ")" if meta["high_open"] else "]"
        return f"{'an integer' if meta['integer'] else 'a number'} in {lo}{meta['low']}, {meta['high']}{hi}"
    return ""


def add_flags(parser) -> None:
    """The technique flags on an argparse parser, from the registered steps' fields: `--SHORT [VALUE]` per
    technique (VALUE sets its main field, options may follow as in the short form: 'int8-static:calibration=
    entropy'), and each field's own `flag` (e.g. --structured). `%optimize` and the CLI share this."""
    for cls in registry.step_types().values():
        main = next((f for f in fields(cls) if f.name == cls.main_field), None)
        doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        if main is None or (main.metadata or {}).get("choices") == (True,):
            parser.add_argument(f"--{cls.short}", action="store_true", default=None, help=doc)
            continue
        values = _describe_field(main)
        default = _default(main)
        parser.add_argument(f"--{cls.short}", nargs="?", const=True, default=None, metavar=main.name.upper(),
                            help=f"{doc}; {main.name}: {values + ', ' if values else ''}default {_fmt(default)}")
    for key, (cls, f) in flag_fields().items():
        bool_field = (f.metadata or {}).get("choices") == (True, False)
        help_text = f"{f.metadata.get('help') or f.name} (with --{cls.short})"
        if bool_field:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, action="store_true", default=None,
                                help=help_text)
        else:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, metavar=f.name.upper(),
                                help=help_text)


def flags_from_args(args) -> dict:
    """{flag key: value} of the technique flags argparse parsed (`add_flags`), values typed as in the short form."""
    out = {}
    for key in flag_keys():
        value = getattr(args, key, None)
        if value is not None:
            out[key] = _parse_scalar(value) if isinstance(value, str) and key in flag_fields() else value
    return out


def flag_order(tokens: list[str]) -> list[str]:
    """Technique keys in the order their flags appear on a command line (that order becomes the recipe's)."""
    shorts = {f"--{cls.short}": cls.short for cls in registry.step_types().values()}
    return [shorts[t.split("=")[0]] for t in tokens if t.split("=")[0] in shorts]


def _modules(step: Step) -> dict:
    """Fields holding a torch module keep the module itself (a dict for the engine, not for YAML)."""
    return {f.name: getattr(step, f.name) for f in fields(step) if hasattr(getattr(step, f.name), "parameters")}


# -- recipes ---------------------------------------------------------------------------------------------------
def _step_line(text: str, message: str) -> int | None:
    """1-based YAML line of the field (or else the step) named in `message` ('recipe step N: Step.field: ...')."""
    import yaml

    found = re.match(r"recipe step (\d+):", message)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if isinstance(root, yaml.MappingNode):
        root = next((v for k, v in root.value if k.value == "steps"), None)
    if not found or not isinstance(root, yaml.SequenceNode) or int(found.group(1)) > len(root.value):
        return None
    step = root.value[int(found.group(1)) - 1]
    field_name = re.match(r"recipe step \d+: \w+\.(\w+):", message)
    if field_name and isinstance(step, yaml.MappingNode):
        for key, _ in step.value:
            if key.value == field_name.group(1):
                return key.start_mark.line + 1
    return step.start_mark.line + 1


@dataclass
class Recipe:
    """An ordered list of steps, applied in order to a copy of the model."""

    steps: list = field(default_factory=list)
    name: str | None = None

    def __post_init__(self):
        if isinstance(self.steps, Step):
            self.steps = [self.steps]
        self.steps = list(self.steps)
        for s in self.steps:
            if not isinstance(s, Step):
                names = ", ".join(f"{c.__name__}(...)" for c in registry.step_types().values())
                raise RecipeError(f"Recipe: {s!r} is not a step; use {names}")
        for i, earlier in enumerate(self.steps):
            later = next((s for s in self.steps[i + 1:] if s.stage < earlier.stage), None)
            if later is not None:
                raise RecipeError(f"Recipe: {later.describe()} comes after {earlier.describe()}, which "
                                  f"{earlier.stage_note}; put {later.short} before it")
        if self.name is not None and not isinstance(self.name, str):
            raise RecipeError(f"Recipe: name must be a string, got {self.name!r}")
        self.name = self.name or None

    # -- conversions -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {"steps": [s.to_dict() for s in self.steps]}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, d: dict | list) -> "Recipe":
        if isinstance(d, list):
            d = {"steps": d}
        if not isinstance(d, dict) or "steps" not in d:
            raise RecipeError(f"a recipe dict needs a 'steps' list, got {d!r}")
        extra = set(map(str, d)) - {"steps", "name"}
        if extra:
            raise RecipeError(f"Recipe: unknown key(s) {', '.join(sorted(extra))}; keys are 'name' and 'steps'")
        raw = d["steps"] if d["steps"] is not None else []
        if not isinstance(raw, (list, tuple)):
            raise RecipeError(f"Recipe: 'steps' must be a list of steps, got {type(raw).__name__} {raw!r}")
        steps = []
        for i, s in enumerate(raw):
            if not isinstance(s, dict):
                raise RecipeError(f"recipe step {i + 1}: expected a mapping with a 'type', got {s!r}")
            try:
                steps.append(Step.from_dict(s))
            except RecipeError as e:
                raise RecipeError(f"recipe step {i + 1}: {e}") from None
        name = d.get("name")
        return cls(steps, name=None if name is None else str(name))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        """Parse YAML; an error in a step names the YAML line where that step starts."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe YAML does not parse: {' '.join(str(e).split())}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            line = _step_line(text, str(e))
            raise RecipeError(f"{e} (YAML line {line})" if line else str(e)) from None

    def to_string(self) -> str:
        """The short form used by magics: 'prune=0.5:structured=true,quant=int8'."""
        return ",".join(s.describe() for s in self.steps)

    def __str__(self) -> str:
        return self.to_string() or "(no steps)"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def precisions(self) -> list[tuple]:
        """Per lowering step, the precisions that would do ('int8-dynamic', 'int8-static', 'fp16' ...): what the
        target must be able to run."""
        return [alternatives for s in self.steps for alternatives in [s.precisions()] if alternatives]

    @classmethod
    def parse(cls, spec: Any) -> "Recipe":
        """Accept a Recipe, a Step, a list of steps, a dict, YAML text, a .yaml path or the short string form."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, Step):
            return cls([spec])
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (list, tuple)):
            if all(isinstance(s, Step) for s in spec):
                return cls(list(spec))
            if all(isinstance(s, str) for s in spec):
                return cls([s for text in spec for s in _parse_short(text)])
            return cls.from_dict({"steps": list(spec)})
        if isinstance(spec, str):
            text = spec.strip()
            if text.endswith((".yaml", ".yml")):
                from pathlib import Path

                path = Path(text).expanduser()
                if not path.is_file():
                    raise RecipeError(f"recipe file {text!r} does not exist")
                return cls.from_yaml(path.read_text())
            if "\n" in text or text.startswith(("steps:", "name:", "{", "[")):
                return cls.from_yaml(text)
            return cls(_parse_short(text))
        raise RecipeError(f"cannot make a recipe from {type(spec).__name__}; pass a Recipe, a dict, YAML or "
                          "a string like 'prune=0.5,quant=int8'")


__all__ = ["Recipe", "Step", "option", "from_flags", "flag_keys", "parse_step", "add_flags", "flags_from_args"]
