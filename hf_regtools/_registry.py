"""The technique registry: one entry per technique, enumerated by the CLI, the docs and the test suite.

A technique registers itself from its own folder, the way timm registers models where they are defined: a light
`hf_regtools/<technique>/technique.py` (importing neither torch nor any HF library) calls `register(TechniqueInfo(...))`
with the technique's entry points and its cases for the generic Trainer harness. Every such file is imported when
this module is first imported, so adding a technique touches nothing outside its folder. Entry points are stored as
`"module:attribute"` strings so that reading the registry imports nothing heavy.
"""

from __future__ import annotations

import json
import pkgutil
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
        arxiv (`str`): arXiv identifier, or `""` for a paper without one (`url` is then `metadata.json`'s `link`).
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
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else self.metadata()["link"]

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
    """Add a technique to `TECHNIQUES`; called from the technique's own `technique.py`.

    Raises a `ValueError` if the name is taken or if a Trainer-side technique (callback, optimizer or mixin) comes
    without cases for the generic harness.
    """
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


def technique_folders() -> list[str]:
    """Names of the `hf_regtools` subpackages that declare a technique (have a `technique.py`)."""
    package = files("hf_regtools")
    return sorted(module.name for module in pkgutil.iter_modules([str(package)])
                  if module.ispkg and package.joinpath(module.name, "technique.py").is_file())


def _discover() -> None:
    for folder in technique_folders():
        import_module(f"hf_regtools.{folder}.technique")


_discover()
