"""Techniques, one module each: a config dataclass (a recipe Step) beside its handler, registered on import.
The order here is the order autotune proposes them in."""
from .prune import Prune  # noqa: F401
from .factorize import Factorize  # noqa: F401
from .distill import Distill  # noqa: F401
from .finetune import FineTune  # noqa: F401
from .unpad import Unpad  # noqa: F401
from .quantize import Quantize  # noqa: F401
from .compile import Compile  # noqa: F401
