"""GradInit (Zhu et al., *GradInit: Learning to Initialize Neural Networks for Stable and Efficient Training*,
NeurIPS 2021) with the Trainer, on digits.

`GradInitCallback` rescales every parameter tensor of the freshly built model once, at the start of training (never
on resume), then training runs unchanged; the learned scales go to `OUTPUT_DIR/gradinit_scales.json` and the branch
counts to the logs (`hf_regtools/gradinit/*`). The settings default to the paper's CIFAR launch scripts (SGD step,
eta 0.1, gamma 1, normalized gradient, min scale 0.01, clip 1); `--gradinit_objective gc_gn_sqrt` runs the NIO /
GradCosine target instead. The model is a small transformers or timm model built from a config (see `--model`).

One process (CPU or GPU):

    python examples/gradinit.py --model transformers-vit --gradinit_iterations 50

Several processes (every process runs GradInit on the same batches, then rank 0's weights are broadcast; on CPU
give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/gradinit.py --model timm-vit

Every `TrainingArguments` option works (`--num_train_epochs`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256
--gradinit_iterations 3`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from _digits import MODEL_HELP, MODELS, accuracy, build_model, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import GradInitCallback, GradInitConfig, RegtoolsTrainerMixin


@dataclass
class ExampleArguments:
    model: str = field(default="transformers-vit", metadata={"help": MODEL_HELP})
    gradinit_iterations: int = field(default=100, metadata={"help": "GradInit iterations T"})
    gradinit_lr: float = field(default=1e-3, metadata={"help": "learning rate tau of the scales"})
    gradinit_algorithm: str = field(default="sgd", metadata={
        "help": "the optimizer whose first step is simulated", "choices": ("sgd", "adam")})
    gradinit_inner_lr: float = field(default=0.1, metadata={"help": "learning rate eta of the simulated step"})
    gradinit_gamma: float = field(default=1.0, metadata={"help": "gradient-norm cap (inf disables it)"})
    gradinit_objective: str = field(default="gradinit", metadata={
        "help": "'gradinit' or an NIO target such as 'gc_gn_sqrt'"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class DigitsTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**trainer_defaults("outputs/gradinit"))
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    try:
        config = GradInitConfig(iterations=example.gradinit_iterations, lr=example.gradinit_lr,
                                algorithm=example.gradinit_algorithm, inner_lr=example.gradinit_inner_lr,
                                gamma=math.inf if math.isinf(example.gradinit_gamma) else example.gradinit_gamma,
                                objective=example.gradinit_objective)
    except ValueError as error:
        parser.error(str(error))
    set_seed(training_args.seed)

    model, image_size, channels = build_model(example.model)
    train = digits("train", image_size=image_size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=image_size, channels=channels, limit=example.max_eval_samples)
    trainer = DigitsTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                            compute_metrics=accuracy, callbacks=[GradInitCallback(config)])
    train_and_evaluate(trainer, training_args, **({} if example.model in MODELS else {"finetuned_from": example.model}))


if __name__ == "__main__":
    main()
