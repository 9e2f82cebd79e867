"""Weight rescaling (Liu et al., arXiv:2102.03497) instead of weight decay, with the Trainer.

Trains a small BatchNorm ResNet on scikit-learn's handwritten digits (offline) with SGD momentum. With
`--regularizer wrs` (default) every convolution followed by a BatchNorm is rescaled to norm `--r` per filter after
each optimizer step (`WeightRescalingCallback`) and gets no weight decay (`WeightRescalingTrainerMixin`; the
classifier keeps `--weight_decay`); `--regularizer wd` is the weight-decay baseline. The model is a transformers
`ResNetForImageClassification` (`--model transformers-resnet`) or a timm ResNet in transformers'
`TimmWrapperForImageClassification` (`--model timm-resnet`), both built from a config.

One process (CPU or GPU):

    python examples/weight_rescaling.py --model transformers-resnet --regularizer wrs

Several processes (DDP; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/weight_rescaling.py --model timm-resnet

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _digits import accuracy, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import RegtoolsTrainerMixin, WeightRescalingCallback, WeightRescalingTrainerMixin

MODELS = ("transformers-resnet", "timm-resnet")


@dataclass
class ExampleArguments:
    model: str = field(default="transformers-resnet", metadata={"help": "the model", "choices": MODELS})
    regularizer: str = field(default="wrs", metadata={
        "help": "wrs: weight rescaling on the BN-preceded convolutions (no weight decay on them); wd: weight decay "
                "only", "choices": ("wrs", "wd")})
    r: float = field(default=1.0, metadata={"help": "target filter norm (the paper: 1)"})
    every: int = field(default=1, metadata={"help": "rescale after every k-th optimizer step"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


def build_model(name: str, num_labels: int = 10):
    from transformers import ResNetConfig, ResNetForImageClassification, TimmWrapperConfig, \
        TimmWrapperForImageClassification

    if name == "transformers-resnet":
        config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                              layer_type="basic", num_labels=num_labels)
        return ResNetForImageClassification(config)
    config = TimmWrapperConfig(architecture="resnet18", num_labels=num_labels,
                               model_args={"in_chans": 1, "channels": (16, 32, 64, 128), "stem_width": 16})
    return TimmWrapperForImageClassification(config)


class WRSTrainer(WeightRescalingTrainerMixin, Trainer):
    pass


class WDTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/weight_rescaling"), "optim": "sgd",
                           "optim_args": "momentum=0.9", "learning_rate": 0.1, "weight_decay": 5e-4})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    model = build_model(example.model)
    train = digits("train", limit=example.max_train_samples)
    test = digits("test", limit=example.max_eval_samples)
    if example.regularizer == "wrs":
        try:
            callbacks = [WeightRescalingCallback(r=example.r, every=example.every)]
        except ValueError as error:
            parser.error(str(error))
        trainer_class = WRSTrainer
    else:
        callbacks, trainer_class = [], WDTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                            compute_metrics=accuracy, callbacks=callbacks)
    train_and_evaluate(trainer, training_args)


if __name__ == "__main__":
    main()
