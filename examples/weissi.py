"""WEISSI (Liu, Cui and Chan, arXiv:2008.02965) instead of weight decay, with the Trainer.

Trains a ReLU MLP (`--model mlp`, default) or a BatchNorm ResNet (`--model transformers-resnet` or `timm-resnet`, with
`--bn include` to regularize its convolutions and residual blocks) on scikit-learn's handwritten digits (offline).
With `--regularizer weissi` (default) the loss gets `lambda1 * sum log||W|| + lambda2 * sum ||W/||W|| ||_1` (the
residual form for ResNet blocks) and the regularized weights get no weight decay (`WeissiTrainerMixin`);
`--regularizer wd` is the weight-decay baseline. After training, the mean input-gradient norm of the loss on the test
images (and, for the MLP, the product-of-norms bound) are printed and saved in `input_gradient_results.json` and
`all_results.json` (`eval_input_gradient_norm`, `eval_norm_bound`).

One process (CPU or GPU):

    python examples/weissi.py --regularizer weissi --lambda1 0.3 --lambda2 1e-3

Several processes (DDP; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/weissi.py

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from _digits import DigitsMLP, accuracy, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import RegtoolsTrainerMixin, WeissiTrainerMixin, input_gradient_norm, product_of_norms_bound
from hf_regtools.testing.digits import tensors

MODELS = ("mlp", "transformers-resnet", "timm-resnet")


@dataclass
class ExampleArguments:
    model: str = field(default="mlp", metadata={"help": "the model", "choices": MODELS})
    regularizer: str = field(default="weissi", metadata={
        "help": "weissi: WEISSI on the homogeneous layers (no weight decay on them); wd: weight decay only",
        "choices": ("weissi", "wd")})
    lambda1: float = field(default=0.3, metadata={"help": "coefficient of the log-norm part"})
    lambda2: float = field(default=1e-3, metadata={"help": "coefficient of the L1 part on weight directions"})
    norm: str = field(default="fro", metadata={"help": "layer norm", "choices": ("fro", "spectral")})
    bn: str = field(default="exclude", metadata={"help": "weights feeding a BatchNorm", "choices": ("exclude",
                                                                                                    "include")})
    schedule: str = field(default="constant", metadata={"help": "coefficient schedule",
                                                        "choices": ("constant", "linear", "cosine")})
    warmup: float = field(default=0.0, metadata={"help": "fraction of training the coefficient ramps up over"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


def build_model(name: str, num_labels: int = 10):
    from transformers import ResNetConfig, ResNetForImageClassification, TimmWrapperConfig, \
        TimmWrapperForImageClassification

    if name == "mlp":
        return DigitsMLP(num_labels=num_labels)
    if name == "transformers-resnet":
        config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                              layer_type="basic", num_labels=num_labels)
        return ResNetForImageClassification(config)
    config = TimmWrapperConfig(architecture="resnet18", num_labels=num_labels,
                               model_args={"in_chans": 1, "channels": (16, 32, 64, 128), "stem_width": 16})
    return TimmWrapperForImageClassification(config)


class WeissiTrainer(WeissiTrainerMixin, Trainer):
    pass


class WDTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/weissi"), "optim": "sgd", "optim_args": "momentum=0.9",
                           "learning_rate": 0.05, "weight_decay": 5e-4, "lr_scheduler_type": "constant"})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    model = build_model(example.model)
    train = digits("train", limit=example.max_train_samples)
    test = digits("test", limit=example.max_eval_samples)
    kwargs = dict(model=model, args=training_args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    if example.regularizer == "weissi":
        settings = dict(lambda1=example.lambda1, lambda2=example.lambda2, norm=example.norm, bn=example.bn,
                        schedule=example.schedule, warmup=example.warmup)
        try:
            trainer = WeissiTrainer(**kwargs, weissi=settings)
        except ValueError as error:
            parser.error(str(error))
    else:
        trainer = WDTrainer(**kwargs)
    train_and_evaluate(trainer, training_args)

    pixel_values, labels = tensors(test)
    device = next(model.parameters()).device
    model.eval()
    gradient = input_gradient_norm(model, pixel_values.to(device), labels.to(device), output="loss").mean().item()
    metrics = {"eval_input_gradient_norm": gradient}
    if example.model == "mlp":  # the bound does not cover BatchNorm
        metrics["eval_norm_bound"] = product_of_norms_bound(model).item()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("input_gradient", metrics)


if __name__ == "__main__":
    main()
