"""StochNorm (Kou et al., *Stochastic Normalization*, NeurIPS 2020) with the Trainer: fine-tune a BatchNorm CNN on digits.

`StochNormCallback` converts every BatchNorm of the model to StochNorm when the Trainer is created (before the
optimizer and DDP exist): in training, each channel uses the mini-batch statistics with probability `--p` (the
paper's 0.5) and the pretrained moving statistics otherwise. StochNorm is meant for fine-tuning a pretrained model:
give `--model` the Hub id or folder of a BatchNorm image classifier (a transformers ResNet, or a timm one through
`TimmWrapperForImageClassification`); `transformers-resnet` and `timm-resnet` build small ones from a config
(random weights, to try it out). The saved model keeps BatchNorm's keys, so it loads as the original architecture.
The layers' p and count are logged as `hf_regtools/stochnorm/p` and `hf_regtools/stochnorm/layers`.

One process (CPU or GPU):

    python examples/stochnorm.py --model transformers-resnet --p 0.5

Several processes (DDP; each process draws its masks from its own torch generator; on CPU give each process one
thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/stochnorm.py --model timm-resnet

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _digits import accuracy, build_model, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import RegtoolsTrainerMixin, StochNormCallback

IMAGE_SIZE = 32
MODELS = ("transformers-resnet", "timm-resnet")


@dataclass
class ExampleArguments:
    model: str = field(default="transformers-resnet", metadata={
        "help": f"one of {MODELS} (small BatchNorm ResNets built from a config, for 32x32 digits) or the Hub id or "
                "folder of a BatchNorm image classifier (AutoModelForImageClassification)"})
    p: float = field(default=0.5, metadata={"help": "probability that a channel uses the mini-batch statistics"})
    exclude: str | None = field(default=None, metadata={"help": "regex of BatchNorm layers to keep (module names)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class DigitsTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def build(name: str, num_labels: int = 10):
    """The model named `name` (see `MODELS`) or loaded from a Hub id / folder, its image size and channel count."""
    from transformers import (ResNetConfig, ResNetForImageClassification, TimmWrapperConfig,
                              TimmWrapperForImageClassification)

    if name == "transformers-resnet":
        config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                              num_labels=num_labels)
        return ResNetForImageClassification(config), IMAGE_SIZE, 1
    if name == "timm-resnet":
        config = TimmWrapperConfig(architecture="resnet18", num_labels=num_labels,
                                   model_args={"in_chans": 1, "channels": [16, 32, 64, 128], "stem_width": 16})
        return TimmWrapperForImageClassification(config), IMAGE_SIZE, 1
    return build_model(name, num_labels)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/stochnorm"), "num_train_epochs": 5})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    model, image_size, channels = build(example.model)
    train = digits("train", image_size=image_size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=image_size, channels=channels, limit=example.max_eval_samples)
    try:
        callback = StochNormCallback(p=example.p, exclude=example.exclude)
        trainer = DigitsTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                compute_metrics=accuracy, callbacks=[callback])
    except ValueError as error:  # e.g. a LayerNorm model (ViT, ConvNeXt): StochNorm needs BatchNorm layers
        parser.error(f"--model {example.model}: {error}")
    train_and_evaluate(trainer, training_args, **({} if example.model in MODELS else {"finetuned_from": example.model}))


if __name__ == "__main__":
    main()
