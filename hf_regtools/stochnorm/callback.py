"""Trainer callback for StochNorm (Kou et al., NeurIPS 2020): the surgery at `on_init_end`.

The callback only decides *when*: `apply_stochnorm` runs at the end of `Trainer.__init__`, after the model was moved to
its device and before the optimizer and the DDP wrapper exist, so that both see the StochNorm layers from the first
step. The surgery keeps BatchNorm's state-dict keys, so checkpoints resume into the converted model; the masks come
from torch's generator, which the Trainer saves and restores, so a resumed run draws the masks of the uninterrupted
one. `ExportableState` holds only the constructor arguments.
"""

from __future__ import annotations

from transformers.trainer_callback import ExportableState

from ..trainer import TechniqueMetricsCallback
from .functional import _patterns, apply_stochnorm, stochnorm_layers
from .modules import validate_p

TOO_LATE = (
    "StochNormCallback found no StochNorm layer in {model} at the start of training: the callback converts the model "
    "at on_init_end, which did not run for it (added with trainer.add_callback after Trainer(...), or the model was "
    "re-created by model_init in train()). Pass it to the Trainer, Trainer(..., callbacks=[StochNormCallback(p=...)]), "
    "or call apply_stochnorm(model, p=...) yourself before creating the Trainer and any optimizer (inside model_init "
    "when you use one)."
)


class StochNormCallback(TechniqueMetricsCallback, ExportableState):
    """Convert the model's BatchNorm layers to StochNorm when the `Trainer` is created.

    Args:
        p (`float`, *optional*, defaults to 0.5): probability that a channel uses the mini-batch statistics (the
            official recipe: 0.5).
        include (`str` or `list[str]`, *optional*): regexes of module names to convert (see `apply_stochnorm`).
        exclude (`str` or `list[str]`, *optional*): regexes of module names to keep as BatchNorm.

    Pass it to `Trainer(callbacks=[...])`: `on_init_end` converts the model before the optimizer and DDP exist.
    Added later (`trainer.add_callback`), it raises at `on_train_begin`, naming the fix. Logged as
    `hf_regtools/stochnorm/p` (the layers' `p`, their mean if they differ) and `hf_regtools/stochnorm/layers` (how many). In a custom
    loop, call `apply_stochnorm(model, p=...)` before creating the optimizer instead; nothing else is needed.

    Example:

    ```py
    trainer = Trainer(model, args, train_dataset=train, callbacks=[StochNormCallback(p=0.5)])
    ```
    """

    def __init__(self, p: float = 0.5, *, include: str | list[str] | None = None,
                 exclude: str | list[str] | None = None):
        self.p = validate_p(p)
        _patterns(include, "include"), _patterns(exclude, "exclude")
        self.include, self.exclude = include, exclude
        self.layers: dict = {}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        apply_stochnorm(model, p=self.p, include=self.include, exclude=self.exclude)
        self.layers = stochnorm_layers(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = stochnorm_layers(model) if model is not None else {}
        if not layers:
            raise RuntimeError(TOO_LATE.format(model=type(model).__name__))
        self.layers = layers

    def metrics(self) -> dict[str, float]:
        """The layers' `p` (their mean if they differ) and their number, for `RegtoolsTrainerMixin.log`."""
        if not self.layers:
            return {}
        ps = [layer.p for layer in self.layers.values()]
        p = ps[0] if len(set(ps)) == 1 else sum(ps) / len(ps)
        return {"hf_regtools/stochnorm/p": p, "hf_regtools/stochnorm/layers": len(ps)}

    def state(self) -> dict:
        return {"args": self._ctor_args(), "attributes": {}}

    def technique_use(self):
        """This callback and its settings, for model cards (`RegtoolsTrainerMixin.create_model_card`)."""
        from ..hub import TechniqueUse

        return TechniqueUse("stochnorm", {"callback": type(self).__name__, **self._ctor_args(),
                                          **({"layers": len(self.layers)} if self.layers else {})})

    def _ctor_args(self) -> dict:
        return {"p": self.p, "include": self.include, "exclude": self.exclude}
