"""Settings of GradInit and its NIO / GradCosine variant (torch-free)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

ALGORITHMS = ("sgd", "adam")
OBJECTIVES = ("gradinit", "gc", "gc_gn", "gc_gn_sqrt", "gv", "gv_gn", "gv_gn_sqrt")
NIO_OBJECTIVES = OBJECTIVES[1:]
REFERENCE_MODULE_TYPES = ("Conv2d", "Linear", "BatchNorm2d")
"""The modules whose tensors the official CIFAR code steps (`gradinit_utils.get_ordered_params`)."""


@dataclass
class GradInitConfig:
    """How `gradinit_` learns one scale per parameter tensor (defaults: the spec's "ours" row; the paper's CIFAR
    scripts differ only in `lr` and `iterations`, set per model).

    `module_types` selects the tensors: `None` (default) scales and steps every trainable tensor (LayerNorm,
    embeddings and attention projections included); `"reference"` or a tuple of module class names restores the
    official CIFAR rule (the simulated step and the gradient norm cover only the tensors of those modules, every
    tensor named `*weight*` / `*bias*` is scaled).
    """

    iterations: int = field(default=100, metadata={"help": "GradInit iterations T"})
    lr: float = field(default=1e-3, metadata={"help": "RescaleAdam learning rate tau of the scales"})
    algorithm: str = field(default="sgd", metadata={
        "help": f"the optimizer whose first step is simulated, one of {ALGORITHMS}", "choices": ALGORITHMS})
    inner_lr: float = field(default=0.1, metadata={"help": "learning rate eta of the simulated step"})
    gamma: float = field(default=1.0, metadata={
        "help": "cap on the gradient norm (L2 for sgd, L1 for adam); math.inf disables the constraint"})
    min_scale: float = field(default=0.01, metadata={"help": "lower bound alpha of the scales of non-bias tensors"})
    max_scale: float | None = field(default=None, metadata={"help": "upper bound of every scale (None: unbounded)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip each scale's gradient to [-c, c]; 0 disables"})
    normalize_grad: bool = field(default=True, metadata={
        "help": "sgd: simulate the step along g / ||g|| (the paper's launch scripts)"})
    second_order: bool = field(default=False, metadata={
        "help": "keep the graph through the simulated step (the official code stops the gradient there)"})
    batch_no_overlap: bool = field(default=False, metadata={
        "help": "draw a fresh first half for the objective batch instead of reusing the first half of S"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "RescaleAdam betas"})
    module_types: tuple[str, ...] | str | None = field(default=None, metadata={
        "help": "None: every trainable tensor; 'reference' or module class names: the official CIFAR set"})
    objective: str = field(default="gradinit", metadata={
        "help": f"'gradinit', or an NIO / GradCosine target, one of {NIO_OBJECTIVES} (released: 'gc_gn_sqrt')",
        "choices": OBJECTIVES})
    nio_chunks: int = field(default=4, metadata={"help": "NIO: number K of overlapping chunks of each batch"})
    nio_overlap: float = field(default=0.2, metadata={"help": "NIO: overlap r of neighbouring chunks"})
    nio_mu: float = field(default=1.0, metadata={"help": "NIO: weight mu of the gradient-norm term"})

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.module_types, list):
            self.module_types = tuple(self.module_types)
        if not (isinstance(self.iterations, int) and not isinstance(self.iterations, bool) and self.iterations > 0):
            raise ValueError(f"GradInitConfig.iterations must be a positive integer, got {self.iterations!r}")
        for name in ("lr", "inner_lr"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0 and math.isfinite(value)):
                raise ValueError(f"GradInitConfig.{name} must be a positive finite number, got {value!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"GradInitConfig.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not (_is_number(self.gamma) and self.gamma > 0):
            raise ValueError(f"GradInitConfig.gamma must be > 0 (math.inf disables the constraint), got {self.gamma!r}")
        if not (_is_number(self.min_scale) and 0 <= self.min_scale < math.inf):
            raise ValueError(f"GradInitConfig.min_scale must be a finite number >= 0, got {self.min_scale!r}")
        if self.max_scale is not None and not (_is_number(self.max_scale) and self.max_scale >= max(self.min_scale, 0)
                                               and self.max_scale > 0):
            raise ValueError(f"GradInitConfig.max_scale must be None or a number > 0 and >= min_scale "
                             f"({self.min_scale}), got {self.max_scale!r}")
        if not (_is_number(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"GradInitConfig.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        for name in ("normalize_grad", "second_order", "batch_no_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GradInitConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2 and all(
                _is_number(beta) and 0 <= beta < 1 for beta in self.betas)):
            raise ValueError(f"GradInitConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.module_types == "reference":
            self.module_types = REFERENCE_MODULE_TYPES
        if self.module_types is not None and not (
                isinstance(self.module_types, tuple) and self.module_types
                and all(isinstance(name, str) and name for name in self.module_types)):
            raise ValueError(f"GradInitConfig.module_types must be None, 'reference' or a non-empty tuple of module "
                             f"class names such as {REFERENCE_MODULE_TYPES}, got {self.module_types!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"GradInitConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (isinstance(self.nio_chunks, int) and not isinstance(self.nio_chunks, bool) and self.nio_chunks >= 2):
            raise ValueError(f"GradInitConfig.nio_chunks must be an integer >= 2 (the cosine needs two chunks), "
                             f"got {self.nio_chunks!r}")
        if not (_is_number(self.nio_overlap) and 0 <= self.nio_overlap < 1):
            raise ValueError(f"GradInitConfig.nio_overlap must be in [0, 1), got {self.nio_overlap!r}")
        if not (_is_number(self.nio_mu) and math.isfinite(self.nio_mu)):
            raise ValueError(f"GradInitConfig.nio_mu must be a finite number, got {self.nio_mu!r}")

    @property
    def is_nio(self) -> bool:
        return self.objective != "gradinit"

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (tuples become lists)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
