"""`GradInitCallback`: run GradInit (or NIO) once, at the start of a fresh `Trainer.train()`.

The callback only decides *when*: at `on_train_begin` of a run that starts at step 0 it calls `gradinit_` (or `nio_`)
on the Trainer's model. Resumed runs (`state.global_step > 0`) and later `train()` calls with the same callback skip
it: the checkpoint already holds the rescaled weights.
"""

from __future__ import annotations

import os

from transformers.trainer_callback import ExportableState

from ..trainer import TechniqueMetricsCallback
from .config import GradInitConfig

REPORT_FILE = "gradinit_scales.json"
METRIC_PREFIX = "hf_regtools/gradinit/"


class GradInitCallback(TechniqueMetricsCallback, ExportableState):
    """Rescale the model with GradInit at the start of training (`on_train_begin`, only at `global_step == 0`).

    Args:
        config (`GradInitConfig` or `dict`, *optional*): the settings; defaults to `GradInitConfig()`. An NIO
            `objective` runs `nio_`.
        loss_fn (`Callable`, *optional*): `loss_fn(model, batch)`, as for `gradinit_`.
        batches (`Iterable`, *optional*): the GradInit batches. By default they come from the Trainer's training
            set and collator: shuffled with a generator seeded by `args.seed`, in batches of half the global training
            batch for GradInit (two of them form S, as in the official code) and of the global batch for NIO. Every
            process draws the same batches.
        **overrides: `GradInitConfig` fields replacing those of `config`.

    GradInit runs in fp32 with dropout off, BatchNorm on batch statistics and without the Accelerate autocast patch
    of `forward`; the RNG states are restored afterwards, so the training that follows draws the same random numbers
    and data order as without GradInit. With several processes, rank 0's parameters are broadcast to all. The main
    process writes the `GradInitReport` to `args.output_dir/gradinit_scales.json`. Metrics:
    `hf_regtools/gradinit/{constraint_steps,objective_steps,final_obj,final_gnorm}`.

    In a custom loop, call `gradinit_(model, batches, config=...)` before building the optimizer instead.

    Example:

    ```py
    trainer = Trainer(model, args, train_dataset=train, callbacks=[GradInitCallback(iterations=100, lr=1e-3)])
    ```
    """

    def __init__(self, config: GradInitConfig | dict | None = None, *, loss_fn=None, batches=None, **overrides):
        from .functional import _resolved_config

        if isinstance(config, dict):
            config = GradInitConfig(**config)
        self.config = _resolved_config(config, overrides)
        self.loss_fn, self.batches = loss_fn, batches
        self.report = None
        self.summary: dict[str, float] = {}
        self.done = False

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.done or state.global_step > 0:
            return
        if model is None:
            raise ValueError("GradInitCallback needs the model at on_train_begin")
        from .._trainer_utils import rng_state, set_rng_state
        from .functional import gradinit_, nio_

        batches = self.batches if self.batches is not None else _trainer_batches(args, train_dataloader,
                                                                                 self.config.is_nio)
        saved = rng_state()
        try:
            run = nio_ if self.config.is_nio else gradinit_
            self.report = run(model, batches, config=self.config, loss_fn=self.loss_fn,
                              progress=not args.disable_tqdm and state.is_local_process_zero)
        finally:
            set_rng_state(saved)
        _broadcast_parameters(model)
        self.summary = {"constraint_steps": self.report.constraint_steps,
                        "objective_steps": self.report.objective_steps}
        if self.report.final_obj is not None:
            self.summary["final_obj"] = self.report.final_obj
        if self.report.history:
            self.summary["final_gnorm"] = self.report.history[-1]["gnorm"]
        self.done = True
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self.report.save_json(os.path.join(args.output_dir, REPORT_FILE))

    def metrics(self) -> dict[str, float]:
        """The GradInit summary (branch counts, final objective and gradient norm) once it has run."""
        return {METRIC_PREFIX + name: value for name, value in self.summary.items()}

    def state(self) -> dict:
        return {"args": {"config": self.config.to_dict()},
                "attributes": {"done": self.done, "summary": dict(self.summary)}}

    def technique_use(self):
        """This callback and its settings, for model cards (`RegtoolsTrainerMixin.create_model_card`)."""
        from ..hub import TechniqueUse

        return TechniqueUse("gradinit", {"callback": type(self).__name__, **self.config.to_dict()})


def _trainer_batches(args, train_dataloader, nio: bool):
    """The GradInit batches from the Trainer's training set: a plain `DataLoader` with its own seeded generator (the
    Trainer's dataloader, its sampler and the global RNG stay untouched), identical on every process."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    if train_dataloader is None:
        raise ValueError("GradInitCallback found no train dataloader at on_train_begin; pass batches=...")
    global_batch = args.per_device_train_batch_size * max(args.world_size, 1)
    batch_size = global_batch if nio else max(global_batch // 2, 1)
    dataset = train_dataloader.dataset
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, collate_fn=train_dataloader.collate_fn)
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      collate_fn=train_dataloader.collate_fn)


def _broadcast_parameters(model) -> None:
    from accelerate import PartialState

    if PartialState().num_processes <= 1:
        return
    from accelerate.utils import broadcast

    parameters = [p.data for p in model.parameters()]
    for parameter, received in zip(parameters, broadcast(parameters, from_process=0)):
        if received is not parameter:
            parameter.copy_(received)
