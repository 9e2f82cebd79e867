"""The technique registry: one entry per technique, enumerated by the CLI, the docs and the test suite.

Entry points are stored as `"module:attribute"` strings so that reading the registry imports nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import import_module
from importlib.resources import files
from typing import Any


@dataclass(frozen=True)
class TechniqueInfo:
    """Metadata and entry points of one technique.

    Args:
        name (`str`): package name under `hf_regtools/`, e.g. `"weight_selection"`.
        title (`str`): human-readable name.
        paper (`str`): paper title, authors and venue.
        arxiv (`str`): arXiv identifier.
        code_repo (`str`): official code repository (`owner/name`), or `""`.
        functional (`str`): functional core, as `"module:attribute"`.
        callback (`str`, *optional*): `TrainerCallback` class, as `"module:attribute"`.
        callbacks (`tuple[str, ...]`): the technique's other `TrainerCallback` classes (e.g. presets of `callback`).
        optimizer (`str`, *optional*): optimizer class.
        mixin (`str`, *optional*): Trainer mixin class.
        cli_command (`str`, *optional*): `hf-regtools` sub-command.
        domains (`tuple[str, ...]`): e.g. `("vision",)`.
        harness (`dict`, *optional*): settings for the generic Trainer harness; required when the technique
            has a Trainer component (callback, optimizer or mixin).
    """

    name: str
    title: str
    paper: str
    arxiv: str
    code_repo: str
    functional: str
    callback: str | None = None
    callbacks: tuple[str, ...] = ()
    optimizer: str | None = None
    mixin: str | None = None
    cli_command: str | None = None
    domains: tuple[str, ...] = ("vision",)
    harness: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"

    @property
    def has_trainer_component(self) -> bool:
        return any((self.callback, self.optimizer, self.mixin))

    @property
    def entry_points(self) -> dict[str, str]:
        points = {"functional": self.functional, "callback": self.callback, "optimizer": self.optimizer,
                  "mixin": self.mixin}
        return {kind: target for kind, target in points.items() if target}

    def load(self, kind: str = "functional") -> Any:
        """Import and return an entry point (`"functional"`, `"callback"`, `"optimizer"` or `"mixin"`)."""
        target = self.entry_points.get(kind)
        if target is None:
            raise ValueError(f"technique {self.name!r} has no {kind!r} entry point; it has {sorted(self.entry_points)}")
        module, _, attribute = target.partition(":")
        return getattr(import_module(module), attribute)

    def metadata(self) -> dict[str, Any]:
        """The technique's `metadata.json` (Composer-style method metadata)."""
        return json.loads(files("hf_regtools").joinpath(self.name, "metadata.json").read_text())


TECHNIQUES: dict[str, TechniqueInfo] = {}


def register(info: TechniqueInfo) -> TechniqueInfo:
    if info.name in TECHNIQUES:
        raise ValueError(f"technique {info.name!r} is already registered")
    if info.has_trainer_component and info.harness is None:
        raise ValueError(f"technique {info.name!r} has a Trainer component but no harness settings")
    TECHNIQUES[info.name] = info
    return info


def get_technique(name: str) -> TechniqueInfo:
    """Look a technique up by name; raises a `KeyError` listing the registered ones."""
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise KeyError(f"unknown technique {name!r}; registered: {sorted(TECHNIQUES)}") from None


def list_techniques() -> list[TechniqueInfo]:
    return [TECHNIQUES[name] for name in sorted(TECHNIQUES)]


register(
    TechniqueInfo(
        name="weight_selection",
        title="Weight selection",
        paper="Xu et al., Initializing Models with Larger Ones, ICLR 2024",
        arxiv="2311.18823",
        code_repo="OscarXZQ/weight-selection",
        functional="hf_regtools.weight_selection:select_weights",
        cli_command="select",
    )
)

register(
    TechniqueInfo(
        name="dropout_schedules",
        title="Early/late dropout and stochastic depth",
        paper="Liu et al., Dropout Reduces Underfitting, ICML 2023",
        arxiv="2303.01500",
        code_repo="facebookresearch/dropout",
        functional="hf_regtools.dropout_schedules:DropRateController",
        callback="hf_regtools.dropout_schedules:DropScheduleCallback",
        callbacks=tuple(f"hf_regtools.dropout_schedules:{name}" for name in (
            "EarlyDropoutCallback", "LateDropoutCallback", "EarlyStochasticDepthCallback",
            "LateStochasticDepthCallback")),
        harness={
            "cases": {
                "early_dropout": {
                    "model": "transformers_vit",
                    "model_kwargs": {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2},
                    "callbacks": [("hf_regtools.dropout_schedules:EarlyDropoutCallback",
                                   {"p": 0.3, "cutoff_steps": 3})],
                    "deterministic": False,
                },
                "late_stochastic_depth": {
                    "model": "transformers_convnext",
                    "model_kwargs": {},
                    "callbacks": [("hf_regtools.dropout_schedules:LateStochasticDepthCallback",
                                   {"p": 0.5, "cutoff_steps": 2})],
                    "deterministic": False,
                },
                "early_dropout_timm_vit": {
                    "model": "timm_wrapped_vit",
                    "model_kwargs": {"proj_drop_rate": 0.2, "attn_drop_rate": 0.2},
                    "callbacks": [("hf_regtools.dropout_schedules:EarlyDropoutCallback",
                                   {"p": 0.3, "cutoff_steps": 3})],
                    "deterministic": False,
                },
                "late_stochastic_depth_timm_convnext": {
                    "model": "timm_convnext_classifier",
                    "model_kwargs": {},
                    "callbacks": [("hf_regtools.dropout_schedules:LateStochasticDepthCallback",
                                   {"p": 0.5, "cutoff_steps": 2})],
                    "deterministic": False,
                },
            },
        },
    )
)

register(
    TechniqueInfo(
        name="alpha_svrg",
        title="alpha-SVRG",
        paper="Yin et al., A Coefficient Makes SVRG Effective, ICLR 2025",
        arxiv="2311.05589",
        code_repo="davidyyd/alpha-SVRG",
        functional="hf_regtools.schedules:svrg_alpha_schedule",
        optimizer="hf_regtools.alpha_svrg:AlphaSVRG",
        mixin="hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin",
        harness={"cases": {
            name: {"model": "transformers_vit", "callbacks": [], "mixin": "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin",
                   "model_kwargs": {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
                   "trainer_init_kwargs": {"alpha_svrg": {"alpha0": 0.75, **settings}},
                   "trainer_kwargs": {"max_grad_norm": 0.0, "optim": "sgd", "learning_rate": 0.05},
                   "deterministic": dropout == 0.0}
            for name, settings, dropout in (("snapshot_every_2_steps", {"snapshot_every": 2}, 0.0),
                                            ("full_gradient_in_batches_of_16",
                                             {"snapshot_every": 2, "full_gradient_batch_size": 16}, 0.0),
                                            ("cache_mode", {"mode": "cache"}, 0.0),
                                            ("cache_mode_with_dropout", {"mode": "cache"}, 0.1))
        }},
    )
)
