"""The generic Trainer harness: every registered technique with a Trainer component runs through it.

Each technique's registry entry holds `harness={"cases": {name: case}}`; a case names a tiny model from
`tiny_models` (`"model"`, `"model_kwargs"`), the callbacks to attach (`"callbacks"`: `("module:Class", kwargs)`
pairs), optionally a Trainer mixin (`"mixin"`, default `RegtoolsTrainerMixin`) with its constructor arguments
(`"trainer_init_kwargs"`; `"trainer_init_factory"`, a `("module:function", kwargs)` pair, adds the kwargs that
`function(case, **kwargs)` returns, for arguments built at run time such as a second dataset), a surgery applied to the model before the Trainer is built (`"surgery"`: a
`("module:function", kwargs)` pair; the function changes the model in place or returns it), an optimizer class
(`"optimizer"`: a `("module:Class", kwargs)` pair, passed as `optimizer_cls_and_kwargs`) and `TrainingArguments`
(`"trainer_kwargs"`), and whether training is deterministic given the global batch (`"deterministic"`: no
dropout-like randomness, so 2 processes equal 1 process). A case marked
`"accumulation_equivalent": True` (no BatchNorm, no randomness) must give the same updates with batch 8 and with batch
4 under 2 gradient-accumulation steps: the test of a per-update loss term (`trainer.add_per_update_term`).

Models cover both libraries and both modalities (`tiny_models.INPUTS`): transformers models, timm models as they
reach a `Trainer` (in `TimmWrapperForImageClassification` or in a user module returning `{"loss", "logits"}`), ViT,
ConvNeXt and Swin, BatchNorm ResNets, and a BERT-style text encoder. The synthetic dataset has `DATASET_SIZE` = 60
examples, not a multiple of the batch, so every epoch ends with a smaller batch.

`python -m hf_regtools.testing.harness TECHNIQUE CASE OUT --steps N --batch B --dataset-size D` trains once and writes
each rank's parameters to `OUT/rank{i}.pt`; under `torchrun --nproc_per_node 2` it trains on 2 CPU processes (gloo).
(Without `mpirun`, `accelerate launch --cpu --num_processes 2` starts only one process.)
"""

from __future__ import annotations

import argparse
import os
from importlib import import_module
from pathlib import Path

import torch

from . import tiny_models

REQUIRED_KEYS = ("model", "callbacks", "deterministic")
DATASET_SIZE = 60


def cases() -> list[tuple[str, str, dict]]:
    """`(technique, case name, case)` for every registered technique with a Trainer component."""
    from .._registry import list_techniques

    return [(info.name, name, case) for info in list_techniques() if info.has_trainer_component
            for name, case in info.harness["cases"].items()]


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(import_module(module), attribute)


def build_model(case: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(tiny_models, case["model"])(**case.get("model_kwargs", {}))
    if "surgery" in case:
        target, kwargs = case["surgery"]
        model = _load(target)(model, **kwargs) or model
    return model


def build_callbacks(case: dict) -> list:
    return [_load(target)(**kwargs) for target, kwargs in case["callbacks"]]


def dataset(case: dict, size: int = DATASET_SIZE, seed: int = 0):
    """A fixed synthetic dataset for the case's model (`tiny_models.INPUTS`): images, or padded token sequences."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    inputs = tiny_models.INPUTS[case["model"]]
    if "image_size" in inputs:
        side = inputs["image_size"]
        columns = {"pixel_values": torch.randn(size, 3, side, side, generator=generator)}
    else:
        length = inputs["length"]
        lengths = torch.randint(length // 2, length + 1, (size, 1), generator=generator)
        attention_mask = (torch.arange(length) < lengths).long()
        input_ids = torch.randint(1, inputs["vocab_size"], (size, length), generator=generator) * attention_mask
        columns = {"input_ids": input_ids, "attention_mask": attention_mask}
    columns["labels"] = torch.randint(0, 3, (size,), generator=generator)
    return Dataset.from_dict({name: column.numpy() for name, column in columns.items()}).with_format("torch")


def build_trainer(case: dict, output_dir: str | os.PathLike, *, max_steps: int, batch_size: int = 8,
                  save_steps: int | None = None, model=None, callbacks=None, seed: int = 0, dataset_size: int = DATASET_SIZE,
                  trainer_init_kwargs: dict | None = None, **args):
    """A `Trainer` (with the case's mixin, if any) on the case's tiny model and a fixed synthetic dataset."""
    from transformers import Trainer, TrainingArguments

    mixin = _load(case.get("mixin", "hf_regtools.trainer:RegtoolsTrainerMixin"))
    trainer_class = type("HarnessTrainer", (mixin, Trainer), {})
    settings = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
                    learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, seed=seed,
                    save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                    restore_callback_states_from_checkpoint=True, dataloader_num_workers=0, disable_tqdm=True)
    settings.update(case.get("trainer_kwargs", {}))
    settings.update(args)
    init_kwargs = dict(trainer_init_kwargs if trainer_init_kwargs is not None else case.get("trainer_init_kwargs", {}))
    if "trainer_init_factory" in case and trainer_init_kwargs is None:
        target, factory_kwargs = case["trainer_init_factory"]
        init_kwargs.update(_load(target)(case, **factory_kwargs))
    if "optimizer" in case:
        target, optimizer_kwargs = case["optimizer"]
        init_kwargs.setdefault("optimizer_cls_and_kwargs", (_load(target), dict(optimizer_kwargs)))
    return trainer_class(model=model if model is not None else build_model(case, seed),
                         args=TrainingArguments(**settings), train_dataset=dataset(case, dataset_size),
                         callbacks=callbacks if callbacks is not None else build_callbacks(case), **init_kwargs)


def emulate_fp16_loss_scaling(trainer, init_scale: float = 2.0 ** 16) -> None:
    """Give a CPU `Trainer(fp16=True)` what Accelerate gives it on a GPU: fp16 autocast and a `GradScaler`.

    On CPU, Accelerate runs `fp16=True` in fp32 without a scaler; this switches on its own GPU code path (autocast in
    the prepared model and `accelerator.autocast()`, `scaler.scale(loss).backward()`, `scaler.step`/`update`, skipped
    steps) with `torch.amp.GradScaler("cpu")`. Call it before `train()`.
    """
    if not trainer.args.fp16:
        raise ValueError("emulate_fp16_loss_scaling needs a Trainer built with fp16=True")
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)


def main() -> None:
    from accelerate import PartialState

    parser = argparse.ArgumentParser(description="train one harness case (also under torchrun)")
    parser.add_argument("technique")
    parser.add_argument("case")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch size")
    parser.add_argument("--dataset-size", type=int, default=DATASET_SIZE, help="number of training examples")
    args = parser.parse_args()
    from .._registry import get_technique

    case = get_technique(args.technique).harness["cases"][args.case]
    trainer = build_trainer(case, args.output_dir / "run", max_steps=args.steps, batch_size=args.batch,
                            dataset_size=args.dataset_size)
    trainer.train()
    state = PartialState()
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    torch.save(parameters, args.output_dir / f"rank{state.process_index}.pt")


if __name__ == "__main__":
    main()
