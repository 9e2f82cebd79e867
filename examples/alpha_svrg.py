"""alpha-SVRG (Yin et al., *A Coefficient Makes SVRG Effective*, ICLR 2025) with the Trainer, on digits.

`AlphaSVRGTrainerMixin` wraps the Trainer's optimizer (AdamW here) in `AlphaSVRG`, with the paper's settings:
alpha0 0.75 decaying linearly to 0, a snapshot every epoch, no gradient clipping (`max_grad_norm=0`, the official
code never clips). `--svrg_mode snapshot` takes the snapshot's gradient on every batch (3x the compute of the base
optimizer); `--svrg_mode cache` (the official `Cache_SVRG`) computes every step's snapshot gradient in one pass at
each epoch's start (2x, for memory of steps x model size). The model is a small transformers or timm model built
from a config, or any Hub id or folder of an image classifier (see `--model`). The alpha of every logged step is
logged as `hf_regtools/alpha_svrg/alpha`.

One process (CPU or GPU):

    python examples/alpha_svrg.py --svrg_mode snapshot

Several processes (DDP: snapshot gradients and the full gradient mu are averaged across processes; on CPU give
each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/alpha_svrg.py --svrg_mode cache

Every `TrainingArguments` option works (`--num_train_epochs`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, ...). A smoke run: `--num_train_epochs 2 --max_train_samples 300`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _digits import MODEL_HELP, MODELS, accuracy, build_model, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import AlphaSVRGConfig, AlphaSVRGTrainerMixin


@dataclass
class ExampleArguments:
    model: str = field(default="transformers-vit", metadata={"help": MODEL_HELP})
    alpha0: float = field(default=0.75, metadata={"help": "initial coefficient (the paper's default 0.75)"})
    alpha_schedule: str = field(default="linear", metadata={
        "help": "alpha schedule: linear decay to 0 (the paper's) or constant", "choices": ("linear", "constant")})
    svrg_mode: str = field(default="snapshot", metadata={
        "help": "snapshot (a snapshot forward/backward per batch) or cache (one snapshot pass per epoch)",
        "choices": ("snapshot", "cache")})
    snapshot_every: str = field(default="epoch", metadata={
        "help": "snapshot interval: 'epoch' or a number of optimizer steps (snapshot mode only)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})

    def svrg_config(self) -> AlphaSVRGConfig:
        if not (self.snapshot_every == "epoch" or self.snapshot_every.isdigit()):
            raise ValueError(f"--snapshot_every must be 'epoch' or a number of steps, got {self.snapshot_every!r}")
        every = self.snapshot_every if self.snapshot_every == "epoch" else int(self.snapshot_every)
        return AlphaSVRGConfig(alpha0=self.alpha0, kind=self.alpha_schedule, mode=self.svrg_mode,
                               snapshot_every=every)


class DigitsSVRGTrainer(AlphaSVRGTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/alpha_svrg"), "num_train_epochs": 10, "learning_rate": 2e-3})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    try:
        svrg_config = example.svrg_config()
    except ValueError as error:
        parser.error(str(error))
    set_seed(training_args.seed)

    model, image_size, channels = build_model(example.model)
    train = digits("train", image_size=image_size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=image_size, channels=channels, limit=example.max_eval_samples)
    trainer = DigitsSVRGTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                compute_metrics=accuracy, alpha_svrg=svrg_config)
    train_and_evaluate(trainer, training_args, **({} if example.model in MODELS else {"finetuned_from": example.model}))


if __name__ == "__main__":
    main()
