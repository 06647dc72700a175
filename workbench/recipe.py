"""Recipes: an ordered list of small validated steps that round-trips through dict, YAML and a short string.

    >>> from workbench.recipe import Recipe, Quantize, Prune
    >>> r = Recipe([Prune(0.5, structured=True), Quantize("int8")])
    >>> Recipe.parse("prune=0.5:structured=true,quant=int8") == r
    True

A magic's flags, a widget's state and a papermill parameter all become the same dict (`Recipe.to_dict`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import RecipeError

STEP_TYPES: dict[str, type["Step"]] = {}


def _step(kind: str, short: str, main: str):
    """Register a step class under its `type` name, its short-form key and the field the short form sets."""

    def wrap(cls):
        cls.kind, cls.short, cls.main_field = kind, short, main
        STEP_TYPES[kind] = cls
        return cls

    return wrap


def _choice(step: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{step}.{name}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _number(step: str, name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False, integer=False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RecipeError(f"{step}.{name}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise RecipeError(f"{step}.{name}: {value!r} is out of range; allowed {interval}")


def _names(step: str, name: str, value: Any) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{step}.{name}: expected layer names (strings), got {value!r}")
    return tuple(value)


@dataclass
class Step:
    """Base of all steps. `kind` is the step's type name in dicts and YAML."""

    kind: ClassVar[str] = ""
    short: ClassVar[str] = ""
    main_field: ClassVar[str] = ""

    @property
    def needs_train(self) -> bool:
        """Whether this step reads the data's train split (calibration, gradients, training)."""
        return False

    def to_dict(self) -> dict:
        out = {"type": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        d = dict(d)
        kind = d.pop("type", None) or cls.kind
        step_cls = STEP_TYPES.get(str(kind).lower())
        if step_cls is None:
            raise RecipeError(f"unknown step type {kind!r}; known steps: {', '.join(STEP_TYPES)}")
        known = {f.name for f in fields(step_cls)}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(
                f"{step_cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"fields are: {', '.join(sorted(known))}")
        return step_cls(**d)

    def describe(self) -> str:
        """Short form of this step, e.g. 'quant=int8' or 'prune=0.5:structured=true'."""
        main = getattr(self, self.main_field)
        parts = [self.short if main is None else f"{self.short}={_fmt(main)}"]
        for f in fields(self):
            if f.name == self.main_field:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value != default and _short_ok(value):
                parts.append(f"{f.name}={_fmt(value)}")
        return ":".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "+".join(value)
    return str(value)


def _short_ok(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, tuple))


QUANT_DTYPES = ("int8", "int8-dynamic", "int8-static", "fp16", "bf16", "auto")


@_step("quantize", "quant", "dtype")
@dataclass
class Quantize(Step):
    """Lower precision: int8 (dynamic or static, ONNX Runtime or torch), fp16 or bf16; `auto` picks per model.

    `dtype="int8-static"` is shorthand for `dtype="int8", method="static"`.
    """

    dtype: str = "int8"
    method: str = "auto"  # auto | dynamic | static (int8 only)
    per_channel: bool = True
    calibration: str = "minmax"  # minmax | entropy | percentile (static only)
    format: str = "qdq"  # qdq | qoperator (static only)
    calibration_batches: int = 8
    reduce_range: bool | None = None  # None: 7-bit weights where the CPU lacks VNNI (avoids u8*s8 saturation)
    exclude: tuple = ()

    def __post_init__(self):
        _choice("Quantize", "dtype", self.dtype, QUANT_DTYPES)
        if self.dtype in ("int8-dynamic", "int8-static"):
            if self.method not in ("auto", self.dtype[5:]):
                raise RecipeError(f"Quantize: dtype={self.dtype!r} conflicts with method={self.method!r}")
            self.dtype, self.method = "int8", self.dtype[5:]
        _choice("Quantize", "method", self.method, ("auto", "dynamic", "static"))
        if self.method != "auto" and self.dtype not in ("int8", "auto"):
            raise RecipeError(f"Quantize.method: {self.method!r} applies to int8 only, not dtype={self.dtype!r}")
        _choice("Quantize", "per_channel", self.per_channel, (True, False))
        _choice("Quantize", "reduce_range", self.reduce_range, (None, True, False))
        _choice("Quantize", "calibration", self.calibration, ("minmax", "entropy", "percentile"))
        _choice("Quantize", "format", self.format, ("qdq", "qoperator"))
        _number("Quantize", "calibration_batches", self.calibration_batches, 1, 10_000, integer=True)
        self.exclude = _names("Quantize", "exclude", self.exclude)

    @property
    def needs_train(self) -> bool:
        return self.method == "static"

    def describe(self) -> str:
        head = f"quant={self.dtype}" + (f"-{self.method}" if self.method != "auto" else "")
        rest = Step.describe(self).split(":")[1:]
        return ":".join([head] + [p for p in rest if not p.startswith("method=")])


@_step("prune", "prune", "sparsity")
@dataclass
class Prune(Step):
    """Remove weights (unstructured) or whole channels/neurons/heads (structured) by importance."""

    sparsity: float = 0.5
    structured: bool = False
    scope: str = "global"  # global | layer
    criterion: str = "l1"  # l1 | l2 | taylor
    schedule: str | None = None  # None (one-shot) | "iterative:N" | "cubic:N"
    ignore: tuple = ()
    per_layer: str = "uniform"  # uniform | sensitivity (prune less where the metric is fragile)

    def __post_init__(self):
        _number("Prune", "sparsity", self.sparsity, 0, 1, hi_open=True)
        _choice("Prune", "per_layer", self.per_layer, ("uniform", "sensitivity"))
        _choice("Prune", "structured", self.structured, (True, False))
        _choice("Prune", "scope", self.scope, ("global", "layer"))
        _choice("Prune", "criterion", self.criterion, ("l1", "l2", "taylor"))
        if self.schedule is not None:
            kind, _, n = str(self.schedule).partition(":")
            if kind not in ("oneshot", "iterative", "cubic") or (kind != "oneshot" and not n.isdigit()):
                raise RecipeError(
                    f"Prune.schedule: {self.schedule!r} is not allowed; use None, 'oneshot', 'iterative:N' or 'cubic:N'")
        self.ignore = _names("Prune", "ignore", self.ignore)

    @property
    def needs_train(self) -> bool:
        return self.criterion == "taylor" or self.schedule not in (None, "oneshot")

    @property
    def steps(self) -> int:
        """How many pruning rounds the schedule has (1 for one-shot)."""
        return 1 if self.schedule in (None, "oneshot") else int(str(self.schedule).split(":")[1])

    def ratios(self) -> list[float]:
        """Target sparsity after each round: linear for 'iterative:N', cubic (as in GMP) for 'cubic:N'."""
        n, s = self.steps, self.sparsity
        if str(self.schedule).startswith("cubic"):
            return [s * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)]
        return [s * t / n for t in range(1, n + 1)]


def _model_ref(step: str, name: str, value: Any, spec_pattern: str | None = None) -> None:
    """None, a string (a built-in name, 'original', or a spec), or a torch module given in Python."""
    import re

    if value is None or hasattr(value, "parameters"):
        return
    if not isinstance(value, str):
        raise RecipeError(f"{step}.{name}: expected a torch module, a name or None, got {type(value).__name__}")
    if spec_pattern and "=" in value and not re.fullmatch(spec_pattern, value):
        raise RecipeError(f"{step}.{name}: {value!r} is not a spec; use e.g. 'width=0.5' or 'depth=0.5'")


@_step("distill", "distill", "epochs")
@dataclass
class Distill(Step):
    """Train the model (student) to match a teacher's softened outputs (Hinton et al.), or its embeddings.

    teacher: None (the original model), a built-in name, or a torch module.
    student: None (the model coming out of the previous steps), a spec like 'width=0.5' (built-in families) or
        'depth=0.5' (keep every other transformer layer), or a torch module.
    features: hidden states to match too, as 'layer' or 'student_layer:teacher_layer' names (MSE, with a learned
        projection when widths differ).
    """

    epochs: int = 3
    teacher: Any = None
    student: Any = None
    temperature: float = 4.0
    alpha: float = 0.9
    lr: float = 1e-3
    features: tuple = ()
    patience: int | None = 2

    def __post_init__(self):
        _number("Distill", "epochs", self.epochs, 1, 10_000, integer=True)
        _model_ref("Distill", "teacher", self.teacher)
        _model_ref("Distill", "student", self.student, r"(width|depth)=(\d*\.)?\d+")
        _number("Distill", "temperature", self.temperature, 0, 1e6, lo_open=True)
        _number("Distill", "alpha", self.alpha, 0, 1)
        _number("Distill", "lr", self.lr, 0, 10, lo_open=True)
        self.features = _names("Distill", "features", self.features)
        if self.patience is not None:
            _number("Distill", "patience", self.patience, 1, 10_000, integer=True)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("teacher", "student"):  # a module given in Python is named, not serialized
            if hasattr(out[name], "parameters"):
                out[name] = f"<{type(out[name]).__name__} module>"
        return out

    @property
    def needs_train(self) -> bool:
        return True


@_step("factorize", "factorize", "rank_ratio")
@dataclass
class Factorize(Step):
    """Replace Linear/Conv layers by low-rank products where that saves MACs (truncated SVD / Tucker-2)."""

    rank_ratio: float | None = None
    energy: float | None = None
    layers: str = "auto"

    def __post_init__(self):
        if (self.rank_ratio is None) == (self.energy is None):
            raise RecipeError("Factorize: give exactly one of rank_ratio (0, 1] or energy (0, 1]")
        if self.rank_ratio is not None:
            _number("Factorize", "rank_ratio", self.rank_ratio, 0, 1, lo_open=True)
        if self.energy is not None:
            _number("Factorize", "energy", self.energy, 0, 1, lo_open=True)


@_step("finetune", "finetune", "epochs")
@dataclass
class FineTune(Step):
    """Train the model on the data's train split to recover accuracy after a lossy step."""

    epochs: int = 1
    lr: float = 1e-3

    def __post_init__(self):
        _number("FineTune", "epochs", self.epochs, 1, 10_000, integer=True)
        _number("FineTune", "lr", self.lr, 0, 10, lo_open=True)

    @property
    def needs_train(self) -> bool:
        return True


@_step("unpad", "unpad", "enabled")
@dataclass
class Unpad(Step):
    """Run a BERT-family encoder's dense layers on the real tokens only, skipping padding (same outputs)."""

    enabled: bool = True

    def __post_init__(self):
        _choice("Unpad", "enabled", self.enabled, (True,))

    def describe(self) -> str:
        return "unpad"


def _step_line(text: str, message: str) -> int | None:
    """1-based YAML line of the field (or else the step) named in `message` ('recipe step N: Step.field: ...')."""
    import re

    import yaml

    found = re.match(r"recipe step (\d+):", message)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if isinstance(root, yaml.MappingNode):
        root = next((v for k, v in root.value if k.value == "steps"), None)
    if not found or not isinstance(root, yaml.SequenceNode):
        return None
    step = root.value[int(found.group(1)) - 1]
    field_name = re.match(r"recipe step \d+: \w+\.(\w+):", message)
    if field_name and isinstance(step, yaml.MappingNode):
        for key, _ in step.value:
            if key.value == field_name.group(1):
                return key.start_mark.line + 1
    return step.start_mark.line + 1


def from_flags(quant: str | None = None, prune: float | None = None, structured: bool = False,
               distill: bool = False, teacher: str | None = None, epochs: int | None = None,
               factorize: float | None = None, finetune: int | None = None, unpad: bool = False,
               order: list[str] | None = None) -> dict:
    """The recipe dict for command-line style flags (used by `%optimize`, the CLI and the panel).

    Steps follow `order` (the order the flags were given), except that unpad and quantization always come last
    (in that order): nothing can change the model after it is lowered to int8/fp16, and training steps expect the
    original module layout.
    """
    if structured and prune is None:
        raise RecipeError("--structured needs --prune S (the share of channels to remove)")
    if not distill and (teacher is not None or epochs is not None):
        raise RecipeError("--teacher and --epochs go with --distill")
    steps: dict[str, dict] = {}
    if prune is not None:
        steps["prune"] = Prune(prune, structured=structured).to_dict()
    if factorize is not None:
        steps["factorize"] = Factorize(rank_ratio=factorize).to_dict()
    if distill:
        kwargs = {"teacher": teacher} if teacher else {}
        steps["distill"] = Distill(**({"epochs": epochs} if epochs else {}), **kwargs).to_dict()
    if finetune is not None:
        steps["finetune"] = FineTune(finetune).to_dict()
    if unpad:
        steps["unpad"] = Unpad().to_dict()
    if quant is not None:
        steps["quant"] = Quantize(quant).to_dict()
    default = ["prune", "factorize", "distill", "finetune", "unpad", "quant"]
    last = ("unpad", "quant")
    order = [k for k in (order or []) if k in steps] + [k for k in default if k not in (order or [])]
    order = [k for k in order if k not in last and k in steps] + [k for k in last if k in steps]
    if not order:
        raise RecipeError("nothing to do: give at least one of --quant, --prune, --distill, --factorize, "
                          "--finetune, --unpad, or --recipe")
    return {"steps": [steps[k] for k in order]}


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


def _parse_short(text: str) -> list[Step]:
    by_short = {cls.short: cls for cls in STEP_TYPES.values()}
    aliases = {"quantize": "quant", "q": "quant", "fine-tune": "finetune", "factor": "factorize"}
    steps = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        head, *options = item.split(":")
        key, eq, value = head.partition("=")
        key = aliases.get(key.strip().lower(), key.strip().lower())
        cls = by_short.get(key)
        if cls is None:
            raise RecipeError(
                f"unknown step {key!r} in {text!r}; known: {', '.join(by_short)} (e.g. 'prune=0.5,quant=int8')")
        kwargs: dict[str, Any] = {}
        if eq:
            kwargs[cls.main_field] = _parse_scalar(value.strip())
        for opt in options:
            name, eq2, val = opt.partition("=")
            if not eq2:
                raise RecipeError(f"{cls.__name__}: option {opt!r} in {text!r} should look like name=value")
            kwargs[name.strip()] = _parse_scalar(val.strip())
        steps.append(Step.from_dict({"type": cls.kind, **kwargs}))
    if not steps:
        raise RecipeError(f"empty recipe {text!r}; e.g. 'quant=int8' or 'prune=0.5,quant=int8'")
    return steps


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
                raise RecipeError(f"Recipe: {s!r} is not a step; use Quantize(...), Prune(...), Distill(...), "
                                  "Factorize(...), FineTune(...) or Unpad()")
        unpad = next((i for i, s in enumerate(self.steps) if isinstance(s, Unpad)), None)
        later = [s for s in self.steps[unpad + 1:] if not isinstance(s, Quantize)] if unpad is not None else []
        if later:
            raise RecipeError(f"Recipe: {later[0].describe()} comes after unpad, which swaps the encoder for an "
                              "inference-only packed one; put unpad after the steps that train, prune or factorize "
                              "(only quantization may follow it)")

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
        extra = set(d) - {"steps", "name"}
        if extra:
            raise RecipeError(f"Recipe: unknown key(s) {', '.join(sorted(extra))}; keys are 'name' and 'steps'")
        steps = []
        for i, s in enumerate(d["steps"] or []):
            if not isinstance(s, dict):
                raise RecipeError(f"recipe step {i + 1}: expected a mapping with a 'type', got {s!r}")
            try:
                steps.append(Step.from_dict(s))
            except (RecipeError, TypeError) as e:  # TypeError: missing/odd constructor arguments
                raise RecipeError(f"recipe step {i + 1}: {e}") from None
        return cls(steps, name=d.get("name"))

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
            raise RecipeError(f"recipe YAML does not parse: {e}") from None
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
            return cls.from_dict({"steps": list(spec)})
        if isinstance(spec, str):
            text = spec.strip()
            if text.endswith((".yaml", ".yml")):
                from pathlib import Path

                path = Path(text).expanduser()
                if not path.exists():
                    raise RecipeError(f"recipe file {text!r} does not exist")
                return cls.from_yaml(path.read_text())
            if "\n" in text or text.startswith(("steps:", "name:", "{", "[")):
                return cls.from_yaml(text)
            return cls(_parse_short(text))
        raise RecipeError(f"cannot make a recipe from {type(spec).__name__}; pass a Recipe, a dict, YAML or "
                          "a string like 'prune=0.5,quant=int8'")
