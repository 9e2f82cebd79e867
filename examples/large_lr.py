"""Large initial learning rate, then anneal (Li, Wei and Ma, NeurIPS 2019), and the patch diagnostic, with the Trainer.

Trains the same ReLU MLP twice on scikit-learn's handwritten digits (offline) carrying the class-dependent patch of the
paper (`PatchTransform` through `datasets.Dataset.set_transform`, a 3x3 centre patch for the 8x8 images): once with a
large initial learning rate (`--large_lr 0.1`, times `--factor 0.04` from the 1-based epoch `--anneal_epoch`, the
official `decay_early`), once with a small constant one (`--small_lr 0.004`, the official `fixed`), both with SGD (Nesterov,
momentum 0.9, weight decay 5e-4, batch 128) through `class T(LargeLRTrainerMixin, Trainer)`. After every epoch it measures the accuracy on clean test images, on patched
test images and on all-zero images carrying only the patch (`patch_only_eval_set`): the paper's claim is that the
small-LR model learns the patch first (patch-only accuracy rises early) and generalises worse on clean images. The
curves go to `large_lr.png`, the table to the console and `large_lr_results.json`. `--noise_std 0.4` adds the annealed
pre-activation noise (`ActivationNoiseCallback`) to the small-LR run, as the paper's third run.

One process (CPU or GPU):

    python examples/large_lr.py
    python examples/large_lr.py --sep 0.5 --output_dir outputs/large_lr_sep0.5

Several processes (DDP; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/large_lr.py

Every `TrainingArguments` option works (`--num_train_epochs`, `--seed`, `--output_dir`, ...; `--learning_rate` is set
by `--large_lr` / `--small_lr`). A smoke run: `--num_train_epochs 2 --anneal_epoch 2 --max_train_samples 256`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from _digits import DigitsMLP, digits, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_regtools import plot_diagnostics
from hf_regtools.large_lr import (ActivationNoiseCallback, LargeLRTrainerMixin, PatchEpochCallback, PatchTransform,
                                  patch_only_eval_set)
from hf_regtools.testing.digits import tensors

KEYS = ("hf_regtools/large_lr/clean_accuracy", "hf_regtools/large_lr/patched_accuracy",
        "hf_regtools/large_lr/patch_only_accuracy")


@dataclass
class ExampleArguments:
    large_lr: float = field(default=0.1, metadata={"help": "initial learning rate of the large-LR run"})
    small_lr: float = field(default=0.004, metadata={"help": "learning rate of the small-LR run"})
    anneal_epoch: int = field(default=15, metadata={"help": "1-based epoch from which the large LR is annealed"})
    factor: float = field(default=0.04, metadata={"help": "annealing factor of the large LR"})
    noise_std: float = field(default=0.0, metadata={"help": "pre-activation noise of the small-LR run (0: none)"})
    patch: int = field(default=3, metadata={"help": "patch side in pixels"})
    sep: float = field(default=0.1, metadata={"help": "range of the class offsets zeta (official 0.1)"})
    width: int = field(default=256, metadata={"help": "hidden width of the MLP"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class LargeLRTrainer(LargeLRTrainerMixin, Trainer):
    pass


class PatchAccuracyCallback(TrainerCallback):
    """Accuracy on clean, patched and patch-only images at every epoch end, logged and kept in `history`."""

    def __init__(self, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.sets, self.history = sets, []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0)}
        with torch.no_grad():
            for name, (x, y) in self.sets.items():
                device = next(model.parameters()).device
                row[f"hf_regtools/large_lr/{name}_accuracy"] = (
                    model(pixel_values=x.to(device))["logits"].argmax(-1).cpu() == y).float().mean().item()
        model.train(was_training)
        self.history.append(row)
        state.log_history.append(dict(row))


def run(name, lr, schedule, example, training_args, train, sets, transform, noise):
    args = dataclasses.replace(training_args, learning_rate=lr, output_dir=os.path.join(training_args.output_dir, name))
    set_seed(args.seed)
    accuracy = PatchAccuracyCallback(sets)
    callbacks = [PatchEpochCallback(transform), accuracy] + ([noise] if noise is not None else [])
    sgd = (torch.optim.SGD, {"lr": lr, "momentum": 0.9, "nesterov": True})  # the official optimizer
    trainer = LargeLRTrainer(model=DigitsMLP(example.width), args=args, train_dataset=train, callbacks=callbacks,
                             optimizer_cls_and_kwargs=sgd, large_lr=schedule)
    trainer.train()
    trainer.save_state()
    return accuracy.history


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/large_lr"), "optim": "sgd", "weight_decay": 5e-4,
                           "lr_scheduler_type": "constant", "num_train_epochs": 30, "per_device_train_batch_size": 128,
                           "remove_unused_columns": False, "dataloader_num_workers": 0})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    train = digits("train", limit=example.max_train_samples).with_format(None)
    train = train.map(lambda _, i: {"idx": i}, with_indices=True)
    transform = PatchTransform(num_classes=10, patch=example.patch, channels=1, sep=example.sep)
    train.set_transform(transform)
    test_x, test_y = tensors(digits("test", limit=example.max_eval_samples))
    patched, _ = transform.patch(test_x, test_y, range(len(test_y)), epoch=0, seed=transform.draw_kwargs["seed"] + 1)
    sets = {"clean": (test_x, test_y), "patched": (patched, test_y),
            "patch_only": patch_only_eval_set(transform, n=1000, image_shape=(1, 8, 8), seed=training_args.seed)}
    noise = (ActivationNoiseCallback(example.noise_std, anneal=(example.anneal_epoch,), factor=1e-5,
                                     sites=("layers.1", "layers.3")) if example.noise_std > 0 else None)
    runs = {
        f"large LR {example.large_lr}": run("large", example.large_lr,
                                            {"milestones": (example.anneal_epoch,), "factors": (example.factor,)},
                                            example, training_args, train, sets, transform, None),
        f"small LR {example.small_lr}": run("small", example.small_lr, {"schedule": "fixed"}, example,
                                            training_args, train, sets, transform, noise),
    }
    if training_args.process_index == 0:
        print(f"{'run':<18}{'epoch':>6}{'clean':>8}{'patched':>9}{'patch only':>12}")
        for name, history in runs.items():
            for row in history:
                print(f"{name:<18}{row['epoch']:>6}" + "".join(f"{row[k]:>{w}.3f}" for k, w in zip(KEYS, (8, 9, 12))))
        os.makedirs(training_args.output_dir, exist_ok=True)
        plot_diagnostics(runs, os.path.join(training_args.output_dir, "large_lr.png"), keys=KEYS)
        with open(os.path.join(training_args.output_dir, "large_lr_results.json"), "w") as file:
            json.dump(runs, file, indent=1)


if __name__ == "__main__":
    main()
