"""Trainer integration of two-head fine-tuning on target + selected pre-training data (Liu et al., NeurIPS 2022).

`TwoStreamTrainerMixin` pairs every target micro-batch (B examples, from the Trainer's own loader, which sets the
epoch) with `mu * B` examples of the selected source data (`SourceStream`, cycling on its own seeded order), runs them
through the model in one forward and trains on `CE(target) + lambda_u * CE(source)`, or with `fixmatch=True` on the
"without labels" loss of the spec (soft pseudo-labels of a weak view, cross-entropy on a strong view).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .._compat import gradient_accumulation_steps, trainer_divides_loss_by_ga
from .._trainer_utils import config_from_value, updates_per_epoch
from ..schedules import MultiStepLRLambda
from ..trainer import RegtoolsTrainerMixin, save_training_args
from .streams import SourceStream
from .two_head import TwoHeadModel, fixmatch_loss, logits_of, two_stream_loss, write_selection_card

METRIC_PREFIX = "hf_regtools/data_selection/"
STATE_FILE = "data_selection_state.json"
STRONG_KEY = "strong_pixel_values"


@dataclass
class TwoStreamConfig:
    """Settings of `TwoStreamTrainerMixin` (`two_stream=TwoStreamConfig(...)` or the same keys as a dict)."""

    source_dataset: Any = field(default=None, metadata={
        "help": "the selected source data (map-style, e.g. select_pretraining_data(...).dataset) with the images "
                "under `pixel_values` and the source labels under `label` or `labels` once collated"})
    lambda_u: float = field(default=0.3, metadata={"help": "weight of the source loss (0.3 supervised, 1.0 "
                                                           "self-supervised and without labels)"})
    mu: float = field(default=1.0, metadata={"help": "source examples per target example in a batch (mu * B)"})
    head_lr_mult: float = field(default=10.0, metadata={"help": "learning-rate multiplier of the heads"})
    drop_last: bool = field(default=True, metadata={
        "help": "drop the last partial target batch (official; epoch = floor(n_t / B) steps); False keeps the "
                "Trainer's default (dataloader_drop_last)"})
    lr_milestones: list[int] | None = field(default=None, metadata={
        "help": "epochs at which the learning rate is multiplied by lr_gamma (official: [60, 80] of 100); None "
                "keeps the Trainer's lr_scheduler_type"})
    lr_gamma: float = field(default=0.1, metadata={"help": "learning-rate factor at each milestone"})
    fixmatch: bool = field(default=False, metadata={
        "help": "the 'without labels' variant: source labels unused, the target head's soft pseudo-labels of a weak "
                "view train a strong view"})
    threshold: float = field(default=0.0, metadata={"help": "fixmatch: confidence threshold of the mask (released "
                                                            "script: 0.0, every sample)"})
    temperature: float = field(default=1.0, metadata={"help": "fixmatch: softmax temperature of the pseudo-labels"})
    strong_transform: Callable | None = field(default=None, metadata={
        "help": "fixmatch: image tensor -> strongly augmented image tensor, applied to each source `pixel_values` "
                "(the weak view) unless the source rows carry `strong_pixel_values`; default RandAugment(2, 10) "
                "when torchvision is installed"})
    source_num_workers: int = field(default=0, metadata={"help": "DataLoader workers of the source stream"})
    selection: Any = field(default=None, metadata={
        "help": "the DataSelectionReport (or its to_dict()) of the source data, recorded in the model card"})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the pre-trained model, for the card (default: what the backbone records)"})

    def __post_init__(self):
        if self.lambda_u < 0 or self.mu < 0:
            raise ValueError(f"lambda_u and mu must be >= 0, got lambda_u={self.lambda_u}, mu={self.mu}")
        if not self.head_lr_mult > 0 or not self.lr_gamma > 0:
            raise ValueError(f"head_lr_mult and lr_gamma must be > 0, got {self.head_lr_mult}, {self.lr_gamma}")
        if not 0.0 <= self.threshold <= 1.0 or not self.temperature > 0:
            raise ValueError(f"threshold must be in [0, 1] and temperature > 0, got {self.threshold}, "
                             f"{self.temperature}")
        if self.mu > 0 and self.source_dataset is None:
            raise ValueError("TwoStreamConfig needs source_dataset (the selected pre-training data) when mu > 0; "
                             "set mu=0 for target-only fine-tuning")
        if self.lr_milestones is not None:
            MultiStepLRLambda(1, self.lr_milestones, self.lr_gamma)
        if self.fixmatch and self.mu > 0 and self.strong_transform is None:
            self.strong_transform = _default_strong_transform()

    @classmethod
    def from_value(cls, value) -> TwoStreamConfig:
        return config_from_value(cls, value, "two_stream")

    def settings(self) -> dict:
        """The JSON-able settings (for the card and the checkpoint)."""
        skip = {"source_dataset", "selection", "strong_transform"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def _default_strong_transform() -> Callable:
    try:
        from torchvision.transforms import RandAugment
    except ImportError:
        raise ValueError("fixmatch=True needs a strong augmentation: pass strong_transform= (image tensor -> image "
                         "tensor), give the source rows a `strong_pixel_values` column, or install torchvision for "
                         "the default RandAugment(num_ops=2, magnitude=10)") from None
    return RandAugmentOnFloat(RandAugment(num_ops=2, magnitude=10))


class RandAugmentOnFloat:
    """A uint8 image transform (RandAugment) applied to a normalised float image: its range is mapped to 0..255 and
    back, per image."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        low, high = image.min(), image.max()
        scale = (high - low).clamp(min=1e-8)
        as_uint8 = ((image - low) / scale * 255).round().to(torch.uint8)
        return self.transform(as_uint8).to(image.dtype) / 255 * scale + low


class _WithStrongView:
    def __init__(self, collate: Callable, transform: Callable | None):
        self.collate, self.transform = collate, transform

    def __call__(self, rows: list[dict]):
        if self.transform is not None:
            rows = [row if STRONG_KEY in row else {**row, STRONG_KEY: self.transform(torch.as_tensor(
                row["pixel_values"]))} for row in rows]
        return self.collate(rows)


class TwoStreamTrainerMixin(RegtoolsTrainerMixin):
    """Trainer mixin for two-head fine-tuning on target and selected source data (Liu et al., arXiv:2111.12292).

    Args (keyword, to the Trainer's constructor):
        two_stream (`TwoStreamConfig` or `dict`): the settings; `source_dataset` is required unless `mu=0`.

    Each training micro-batch joins the target batch (B = `per_device_train_batch_size`) with `mu * B` source examples
    of this process (`SourceStream`, seeded from `args.seed`; one stream batch per optimizer step, split over its
    accumulated micro-batches, so accumulation equals the whole batch), in one forward of the model
    (`TwoHeadModel`: BatchNorm statistics over the mixed batch), and the loss is `CE(target) + lambda_u *
    CE(source)` (`two_stream_loss`), scaled for gradient accumulation as the Trainer scales its own loss. The target
    loader sets the epoch (`drop_last=True` by default, as the official code); the source stream cycles and its
    position is saved in every checkpoint (`data_selection_state.json`), so a resume continues it. The heads get
    `head_lr_mult` times the learning rate (`create_optimizer`); `lr_milestones` gives the official step decay
    (`create_scheduler`). `hf_regtools/data_selection/{loss_target,loss_source}` are logged (means since the last
    log, over processes). Evaluation runs the target head alone; `save_model` / `push_to_hub` write the target
    classifier (see `TwoHeadModel.save_pretrained`) and a card with the selection and `base_model`.

    With `mu=0` (target only) or `fixmatch=True` the source head of a `TwoHeadModel` takes no part in the loss: it is
    frozen (`requires_grad=False`) when the Trainer is built, so it is neither in the optimizer nor in DDP's gradient
    reduction (no unused-parameter error with `ddp_find_unused_parameters=False`).

    With `fixmatch=True` the source labels are unused: the model (a plain classifier, or a `TwoHeadModel` whose
    target head is used) sees target, weak and strong source views in one forward, and the source term is
    `fixmatch_loss(strong, weak, threshold, temperature)`; `hf_regtools/data_selection/mask_rate` is logged too.

    In a custom loop: `stream = SourceStream(source, mu * B, seed=seed)`, then per step
    `out = model(x_t, source_pixel_values=s["pixel_values"])` with `s = stream.next_batch()` and
    `loss, _ = two_stream_loss(out["logits"], y_t, out["source_logits"], s["labels"], lambda_u=0.3)`.

    Example:

    ```py
    class MyTrainer(TwoStreamTrainerMixin, Trainer):
        pass

    model = TwoHeadModel(backbone, n_target=len(target_classes), n_source=1000)
    trainer = MyTrainer(model, TrainingArguments("out", learning_rate=3e-3), train_dataset=target,
                        two_stream={"source_dataset": selection.dataset, "lambda_u": 0.3, "mu": 1.0,
                                    "lr_milestones": [60, 80], "selection": selection.report})
    ```
    """

    def __init__(self, *args, two_stream=None, **kwargs):
        if two_stream is None:
            raise ValueError("TwoStreamTrainerMixin needs two_stream={'source_dataset': ..., ...} (or a "
                             "TwoStreamConfig)")
        self.two_stream_config = TwoStreamConfig.from_value(two_stream)
        super().__init__(*args, **kwargs)
        config = self.two_stream_config
        if getattr(self.args, "fsdp", None):
            raise ValueError("TwoStreamTrainerMixin does not support FSDP; train with DDP")
        if not config.fixmatch and config.mu > 0 and "source_pixel_values" not in _forward_parameters(self.model):
            raise ValueError(f"{type(self.model).__name__}.forward takes no source_pixel_values: wrap the classifier "
                             "as TwoHeadModel(model, n_target=..., n_source=...) for the supervised two-head loss, or "
                             "set fixmatch=True for the variant without source labels")
        if isinstance(self.model, TwoHeadModel) and (config.mu == 0 or config.fixmatch):
            self.model.source_head.requires_grad_(False)
        self._source_stream: SourceStream | None = None
        self._resume_position: int | None = None
        self._step_source: list | None = None
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._logged_metrics: dict[str, float] = {}
        self.target_batches_per_epoch: int | None = None

    # data -------------------------------------------------------------------------------------------------------

    def source_batch_size(self) -> int:
        """`mu * B` source examples per process and micro-batch."""
        size = self.two_stream_config.mu * self.args.per_device_train_batch_size
        if size and round(size) < 1:
            raise ValueError(f"mu={self.two_stream_config.mu} gives less than one source example per batch of "
                             f"{self.args.per_device_train_batch_size}")
        return int(round(size))

    def source_stream(self) -> SourceStream | None:
        """This process's `SourceStream` (built on first use; `None` with `mu=0`). One stream batch serves one
        optimizer step: `mu * B * gradient_accumulation_steps` examples, split over the step's micro-batches."""
        config = self.two_stream_config
        if self._source_stream is None and config.mu > 0:
            collate = self.data_collator
            if config.fixmatch:
                collate = _WithStrongView(collate, config.strong_transform)
            self._source_stream = SourceStream(
                config.source_dataset, self.source_batch_size() * self.args.gradient_accumulation_steps,
                seed=self.args.seed,
                rank=self.args.process_index, world_size=self.args.world_size, collate_fn=collate,
                num_workers=config.source_num_workers)
        return self._source_stream

    def get_train_dataloader(self):
        """The target loader (the Trainer's), with `drop_last` as configured; also makes the source stream."""
        drop_last = self.args.dataloader_drop_last
        if self.two_stream_config.drop_last:
            self.args.dataloader_drop_last = True
        try:
            loader = super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = drop_last
        try:
            self.target_batches_per_epoch = len(loader)
        except TypeError:
            self.target_batches_per_epoch = None
        self.source_stream()
        return loader

    def _next_source_batch(self, device) -> dict | None:
        """The source examples of this micro-batch: slice `i` of the optimizer step's stream batch (drawn at the
        step's first micro-batch), so that accumulating `k` micro-batches of `B` reads the source examples of one
        batch of `k * B`."""
        stream = self.source_stream()
        if stream is None:
            return None
        if self._resume_position is not None:
            stream.position, self._resume_position = self._resume_position, None
            self._step_source = None
        accumulation = self.args.gradient_accumulation_steps
        if self._step_source is None or self._step_source[0] != self.state.global_step or \
                self._step_source[1] == accumulation:
            batch = stream.next_batch()
            self._step_source = [self.state.global_step, 0, {
                key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}]
        chunk, size = self._step_source[1], self.source_batch_size()
        self._step_source[1] += 1
        return {key: value[chunk * size:(chunk + 1) * size] for key, value in self._step_source[2].items()}

    # loss -------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        config = self.two_stream_config
        images, labels = inputs["pixel_values"], inputs["labels"]
        source = self._next_source_batch(images.device)
        if config.fixmatch:
            loss, outputs, parts = self._fixmatch_loss(model, images, labels, source)
        else:
            outputs = model(pixel_values=images, source_pixel_values=None if source is None else
                            source["pixel_values"])
            source_labels = None if source is None else _source_labels(source)
            loss, parts = two_stream_loss(outputs["logits"], labels, outputs.get("source_logits"), source_labels,
                                          lambda_u=config.lambda_u)
        if not trainer_divides_loss_by_ga(self, num_items_in_batch):
            loss = loss / gradient_accumulation_steps(self)
        self._accumulate(parts)
        return (loss, outputs) if return_outputs else loss

    def _fixmatch_loss(self, model, images, labels, source):
        config = self.two_stream_config
        if source is None:
            logits = logits_of(model(pixel_values=images))
            loss, parts = two_stream_loss(logits, labels, None, None, lambda_u=config.lambda_u)
            return loss, {"logits": logits}, parts
        if STRONG_KEY not in source:
            raise ValueError(f"fixmatch=True: the source batch has no {STRONG_KEY!r}; give strong_transform= or a "
                             f"{STRONG_KEY!r} column")
        weak, strong = source["pixel_values"], source[STRONG_KEY]
        logits = logits_of(model(pixel_values=torch.cat([images, weak, strong])))
        target_logits, weak_logits, strong_logits = logits.split([len(images), len(weak), len(strong)])
        loss_target, parts = two_stream_loss(target_logits, labels, None, None, lambda_u=config.lambda_u)
        loss_source, mask = fixmatch_loss(strong_logits, weak_logits, threshold=config.threshold,
                                          temperature=config.temperature)
        parts.update(loss_source=loss_source.detach(), mask_rate=mask.mean())
        return loss_target + config.lambda_u * loss_source, {"logits": target_logits}, parts

    # optimizer and schedule -------------------------------------------------------------------------------------

    def head_parameters(self, model) -> list[torch.nn.Parameter]:
        """The parameters that get `head_lr_mult`: both heads of a `TwoHeadModel`, else the classifier head."""
        if isinstance(model, TwoHeadModel):
            return model.head_parameters()
        from ..adapters.heads import find_classifier_head

        head = find_classifier_head(model)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no classifier head for head_lr_mult; set head_lr_mult=1.0")
        return list(head.linear.parameters())

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the heads' parameters in groups of `head_lr_mult` times the learning rate
        (marked `"head": True`). An optimizer passed to the Trainer is used as it is."""
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        multiplier = self.two_stream_config.head_lr_mult
        if given or multiplier == 1.0:
            return optimizer
        from .._trainer_utils import unwrap_optimizer

        inner = unwrap_optimizer(optimizer)
        heads = {id(p) for p in self.head_parameters(model if model is not None else self.model)}
        head_groups = []
        for group in inner.param_groups:
            moved = [p for p in group["params"] if id(p) in heads]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in heads]
                head_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                    "lr": group["lr"] * multiplier, "head": True})
        inner.param_groups[:] = [group for group in inner.param_groups if group["params"]]
        for group in head_groups:
            inner.add_param_group(group)
        return optimizer

    def updates_per_epoch(self) -> int:
        batches = self.target_batches_per_epoch
        if batches is None:
            batches = len(self.get_train_dataloader())
        return updates_per_epoch(batches, self.args.gradient_accumulation_steps)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `lr_milestones`: the learning rate times `lr_gamma` at each milestone epoch (`MultiStepLRLambda`, a
        pure function of the step, so resuming restores it); else the Trainer's scheduler."""
        config = self.two_stream_config
        if config.lr_milestones is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR

        self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                     MultiStepLRLambda(self.updates_per_epoch(), config.lr_milestones, config.lr_gamma))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # metrics ----------------------------------------------------------------------------------------------------

    def _accumulate(self, parts: dict) -> None:
        for name, value in parts.items():
            value = value.detach().float()
            self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value
        self._metric_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_count:
            names = sorted(self._metric_sums)
            values = torch.stack([self._metric_sums[name] for name in names]) / self._metric_count
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            self._logged_metrics = {f"{METRIC_PREFIX}{name}": float(v) for name, v in zip(names, values.tolist())}
            self._metric_sums, self._metric_count = {}, 0
            logs = {**logs, **self._logged_metrics}
        super().log(logs, *args, **kwargs)

    def technique_metrics(self) -> dict[str, float]:
        return {**super().technique_metrics(), **self._logged_metrics}

    # checkpoints, saving, card ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_position = 0
        self._metric_sums, self._metric_count = {}, 0
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.join(checkpoint, STATE_FILE)
            if os.path.isfile(path):
                state = json.loads(open(path).read())
                stream = self.source_stream()
                if stream is not None:
                    stream.load_state_dict(state["source_stream"])
                    self._resume_position = stream.position
            elif self.two_stream_config.mu > 0:
                warnings.warn(f"{checkpoint} has no {STATE_FILE} (not written by TwoStreamTrainerMixin): the source "
                              "stream restarts from its beginning", UserWarning, stacklevel=2)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _is_checkpoint(self, output_dir, internal: bool) -> bool:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return internal and output_dir is not None and \
            os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints hold the whole two-head model and the source-stream position; the final model (and
        `push_to_hub`) is the target classifier alone, loadable as an ordinary timm or transformers classifier."""
        model = self.accelerator.unwrap_model(self.model)
        if self._is_checkpoint(output_dir, _internal_call):
            super().save_model(output_dir, _internal_call=_internal_call)
            stream = self._source_stream
            if self.args.should_save:
                state = {"source_stream": stream.state_dict() if stream is not None else None,
                         "settings": self.two_stream_config.settings()}
                with open(os.path.join(output_dir, STATE_FILE), "w") as file:
                    json.dump(state, file, indent=1)
            return
        if not isinstance(model, TwoHeadModel):
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model.save_pretrained(output_dir, selection=self.two_stream_config.selection,
                                  base_model=self.two_stream_config.base_model)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            save_training_args(self.args, output_dir)


    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        card = os.path.join(self.args.output_dir, "README.md")
        model = self.accelerator.unwrap_model(self.model)
        if self.is_world_process_zero() and os.path.isfile(card):
            config = self.two_stream_config
            base = config.base_model or getattr(model, "base_model_name", None)
            library = model.library if isinstance(model, TwoHeadModel) else None
            write_selection_card(card, selection=config.selection, base_model=base, library=library,
                                 n_target=getattr(model, "n_target", None))

    def technique_use(self):
        from ..hub import TechniqueUse

        config = self.two_stream_config
        settings = {"mixin": "TwoStreamTrainerMixin", **{k: v for k, v in config.settings().items() if v is not None}}
        if config.source_dataset is not None:
            settings["source_examples"] = len(config.source_dataset)
        return TechniqueUse("data_selection", settings)

    def technique_uses(self) -> list:
        return super().technique_uses() + [self.technique_use()]


def _source_labels(source: dict) -> torch.Tensor:
    for key in ("labels", "label"):
        if key in source:
            return source[key]
    raise ValueError(f"the source batch has no labels (keys: {sorted(source)}); the source dataset needs a `label` "
                     "or `labels` column with the source class of each example (or set fixmatch=True)")


def _forward_parameters(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
