"""Early / late dropout and stochastic depth (Liu et al., *Dropout Reduces Underfitting*, ICML 2023) with the Trainer.

Trains an image classifier on scikit-learn's handwritten digits (offline) with one of the four schedules, through
`RegtoolsTrainerMixin` (the rate reaches every reporter, resuming is exact, the model card records the technique).
The model is a small transformers or timm model built from a config (`--model transformers-vit`, `timm-vit`, ...; the
timm ones as transformers' `TimmWrapperForImageClassification`), or any Hub id or folder of an image classifier.
transformers ViT has dropout but no stochastic depth, transformers ConvNeXt stochastic depth but no dropout.

One process (CPU or GPU):

    python examples/dropout_schedules.py --model transformers-vit --technique early-dropout

Several processes (DDP; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/dropout_schedules.py --model timm-vit \
        --technique late-stochastic-depth

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _digits import MODEL_HELP, MODELS, accuracy, build_model, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import (EarlyDropoutCallback, EarlyStochasticDepthCallback, LateDropoutCallback,
                         LateStochasticDepthCallback, RegtoolsTrainerMixin, UnsupportedModelError)

TECHNIQUES = {  # the rate of the official recipes: ViT-T early dropout and early s.d., ViT-B late s.d.
    "early-dropout": (EarlyDropoutCallback, 0.1),
    "late-dropout": (LateDropoutCallback, 0.1),
    "early-stochastic-depth": (EarlyStochasticDepthCallback, 0.5),
    "late-stochastic-depth": (LateStochasticDepthCallback, 0.4),
}


@dataclass
class ExampleArguments:
    model: str = field(default="transformers-vit", metadata={"help": MODEL_HELP})
    technique: str = field(default="early-dropout", metadata={"help": "the schedule", "choices": tuple(TECHNIQUES)})
    rate: float | None = field(default=None, metadata={
        "help": "dropout / drop-path rate while active (default: the official recipe's, "
                + ", ".join(f"{name} {rate}" for name, (_, rate) in TECHNIQUES.items()) + ")"})
    cutoff_fraction: float = field(default=1 / 6, metadata={
        "help": "cutoff as a fraction of the training steps (the official recipe: 50 of 300 epochs)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class DigitsTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**trainer_defaults("outputs/dropout_schedules"))
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    model, image_size, channels = build_model(example.model)
    train = digits("train", image_size=image_size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=image_size, channels=channels, limit=example.max_eval_samples)
    callback_class, official_rate = TECHNIQUES[example.technique]
    try:
        callback = callback_class(p=official_rate if example.rate is None else example.rate,
                                  cutoff_fraction=example.cutoff_fraction)
        trainer = DigitsTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                compute_metrics=accuracy, callbacks=[callback])
    except UnsupportedModelError as error:  # e.g. stochastic depth on a transformers ViT, which has none
        parser.error(f"--technique {example.technique} does not apply to --model {example.model}: {error}")
    except ValueError as error:
        parser.error(str(error))
    train_and_evaluate(trainer, training_args, **({} if example.model in MODELS else {"finetuned_from": example.model}))


if __name__ == "__main__":
    main()
