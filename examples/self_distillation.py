"""Self-distillation (Mobahi, Farajtabar and Bartlett, NeurIPS 2020) and distillation after weight selection, on digits.

`--experiment rounds` (default): `run_self_distillation` trains `--rounds` rounds of the same model; round 1 learns
the labels, round k+1 a fresh model on round k's predictions (`DistillationTrainerMixin`: `--loss mse` or `kl` with
`--temperature`, mixed with the labels by `--alpha`; 0 is the paper's pure-prediction setting). Each round is a folder
`<output_dir>/round-k` holding its model (loadable with `from_pretrained`, a timm model also with
`timm.create_model("local-dir:...")`); a rerun resumes from the last complete round, and inside a round from its
last checkpoint (`--save_strategy steps --save_steps N`). Prints the test accuracy per round.

`--experiment weight-selection`: the combination of *Initializing Models with Larger Ones* (Xu et al., ICLR 2024):
a ViT teacher (width 64, depth 4) is trained on the digits; a student (width 32, depth 2) initialized by weight
selection from it (`select_weights`, classifier kept: same label space) is then distilled from it, next to the
same student without distillation and the student from random initialization. Prints the test accuracies.

`--experiment weight-selection-text`: the same combination for a language model: a Llama-layout decoder teacher
(width 64, 4 layers, grouped-query attention) is trained on byte tokens of the Python standard library's own source
files; a student (width 32, 2 layers) is cut from it with `initialize_student` and distilled from it (the kl loss on
every token's next-byte distribution), next to the same student without distillation and from random
initialization. Prints the validation losses (next-byte cross-entropy on the other half of the standard library).
Unless told otherwise, the students train one epoch over 8,192 windows of 64 bytes in batches of 16 at learning rate
3e-3, and the teacher four (`--teacher_epochs`): weight selection starts the student from a better model than
itself, as a pretrained teacher would be.

`--experiment kernel`: the paper's theory, `kernel_self_distillation` on 40 noisy samples of sin(3x) (RBF kernel,
the constraint eps): prints c_t and the training and test errors per round until the collapse, and plots the
coefficients per eigen-direction and the test error per round to `<output_dir>/kernel_self_distillation.png`.

One process (CPU or GPU):

    python examples/self_distillation.py --experiment rounds --rounds 4 --model transformers-vit
    python examples/self_distillation.py --experiment weight-selection --loss kl --temperature 2 --alpha 0.5
    python examples/self_distillation.py --experiment weight-selection-text --loss kl --alpha 0.5

Several processes (DDP; the teacher is replicated on every process; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/self_distillation.py --experiment rounds --rounds 3

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, ...). A smoke run:
`--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from _digits import MODEL_HELP, accuracy, build_model, digits, trainer_defaults
from transformers import (AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments, ViTConfig,
                          ViTForImageClassification, set_seed)

from hf_regtools import RegtoolsTrainerMixin
from hf_regtools.self_distillation import (DistillationConfig, DistillationTrainerMixin, kernel_self_distillation,
                                           run_self_distillation)
from hf_regtools.testing.stdlib_text import VOCAB_SIZE, stdlib_dataset
from hf_regtools.weight_selection import initialize_student, select_weights

EXPERIMENTS = ("rounds", "weight-selection", "weight-selection-text", "kernel")
TEXT_SEQUENCES = 8192
TEXT_DEFAULTS = {"num_train_epochs": 1, "teacher_epochs": 4, "per_device_train_batch_size": 16, "learning_rate": 3e-3}


@dataclass
class ExampleArguments:
    experiment: str = field(default="rounds", metadata={"help": "what to run", "choices": EXPERIMENTS})
    model: str = field(default="transformers-vit", metadata={"help": f"rounds: {MODEL_HELP}"})
    rounds: int = field(default=4, metadata={"help": "rounds: the number of rounds"})
    init: str = field(default="fresh", metadata={"help": "rounds: each round from a fresh model or from the "
                                                         "previous one", "choices": ("fresh", "warm")})
    loss: str = field(default="mse", metadata={"help": "distillation loss", "choices": ("mse", "kl")})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the kl loss"})
    alpha: float = field(default=0.0, metadata={"help": "weight of the true labels (0: pure prediction)"})
    teacher_epochs: float | None = field(default=None, metadata={
        "help": "weight-selection experiments: the teacher's epochs (default: --num_train_epochs; text: 4)"})
    eps: float = field(default=0.02, metadata={"help": "kernel: the training-error constraint"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": f"use only the first N training images (text: windows of 64 bytes, default {TEXT_SEQUENCES})"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "use only the first N test images (text: validation windows, default 256)"})


class DistillTrainer(DistillationTrainerMixin, Trainer):
    pass


class PlainTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def distillation_settings(example: ExampleArguments) -> dict:
    return {"loss": example.loss, "temperature": example.temperature, "alpha": example.alpha}


def with_output_dir(training_args: TrainingArguments, output_dir) -> TrainingArguments:
    return TrainingArguments(**{**training_args.to_dict(), "output_dir": str(output_dir)})


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def experiment_rounds(example, training_args, train, test):
    def model_init():
        return build_model(example.model)[0]

    def factory(model, teacher, *, round, output_dir):
        return DistillTrainer(model, with_output_dir(training_args, output_dir), train_dataset=train,
                              eval_dataset=test, compute_metrics=accuracy, teacher=teacher,
                              distillation=distillation_settings(example), distillation_round=round)

    results = run_self_distillation(model_init, factory, rounds=example.rounds, output_dir=training_args.output_dir,
                                    init=example.init, seed=training_args.seed)
    rows = [(r.round, r.status, f"{r.eval_metrics.get('eval_accuracy', float('nan')):.4f}",
             f"{r.eval_metrics.get('eval_loss', float('nan')):.4f}") for r in results]
    return table(rows, ("round", "status", "test accuracy", "test loss (labels)")), {
        f"round_{r.round}_accuracy": r.eval_metrics.get("eval_accuracy") for r in results}


def vit(hidden_size: int, layers: int, heads: int) -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden_size,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               intermediate_size=2 * hidden_size, num_labels=10))


def compare_students(example, training_args, train, test, *, teacher, teacher_name, student, metric, **trainer_kwargs):
    """Train the teacher, then the student (`student(selected)`: from random init, or by weight selection from the
    trained teacher) with and without distillation from it; returns `{model: eval metric}`."""
    output = Path(training_args.output_dir)

    def fit(name, model, trainer_class, args=training_args, **kwargs):
        trainer = trainer_class(model, with_output_dir(args, output / name), train_dataset=train,
                                eval_dataset=test, **trainer_kwargs, **kwargs)
        trainer.train()
        trainer.save_model()
        return trainer.evaluate()[f"eval_{metric}"]

    teacher_args = training_args
    if example.teacher_epochs is not None:
        teacher_args = TrainingArguments(**{**training_args.to_dict(), "num_train_epochs": example.teacher_epochs})
    results = {teacher_name: fit("teacher", teacher, PlainTrainer, teacher_args)}

    def seeded_student(selected: bool):
        set_seed(training_args.seed + 1)
        return student(selected)

    distill = dict(teacher=copy.deepcopy(teacher), distillation=distillation_settings(example))
    results["student, random init"] = fit("random", seeded_student(False), PlainTrainer)
    results["student, random init + distillation"] = fit("random_distilled", seeded_student(False), DistillTrainer,
                                                         **distill)
    results["student, weight selection"] = fit("selected", seeded_student(True), PlainTrainer)
    results["student, weight selection + distillation"] = fit("selected_distilled", seeded_student(True),
                                                              DistillTrainer, **distill)
    return results


def experiment_weight_selection(example, training_args, train, test):
    set_seed(training_args.seed)
    teacher = vit(64, 4, 4)

    def student(selected: bool):
        model = vit(32, 2, 2)
        if selected:
            select_weights(teacher, model, keep_classifier=True)
        return model

    results = compare_students(example, training_args, train, test, teacher=teacher, student=student,
                               teacher_name="teacher (64 wide, 4 deep)", metric="accuracy", compute_metrics=accuracy)
    rows = [(name, f"{value:.4f}") for name, value in results.items()]
    return table(rows, ("model", "test accuracy")), results


def decoder(hidden_size: int, layers: int, heads: int, kv_heads: int):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB_SIZE, hidden_size=hidden_size, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  intermediate_size=2 * hidden_size, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def experiment_weight_selection_text(example, training_args):
    train = stdlib_dataset("train", max_sequences=example.max_train_samples or TEXT_SEQUENCES)
    validation = stdlib_dataset("validation", max_sequences=example.max_eval_samples or 256)
    set_seed(training_args.seed)
    teacher = decoder(64, 4, 4, 2)

    def student(selected: bool):
        if selected:
            return initialize_student(teacher, hidden_size=32, depth=2, num_heads=2, progress=False).model
        return decoder(32, 2, 2, 1)

    results = compare_students(example, training_args, train, validation, teacher=teacher, student=student,
                               teacher_name="teacher (64 wide, 4 layers)", metric="loss")
    rows = [(name, f"{value:.4f}") for name, value in results.items()]
    return table(rows, ("model", "validation loss (next byte)")), results


def experiment_kernel(example, training_args):
    import numpy as np

    rng = np.random.default_rng(training_args.seed)
    x = rng.uniform(-1, 1, 40)
    y = np.sin(3 * x) + 0.3 * rng.standard_normal(40)
    x_test = np.linspace(-1, 1, 200)
    result = kernel_self_distillation(x, y, eps=example.eps, rounds=100)
    rows, test_errors = [], []
    for r in result.rounds:
        test_errors.append(float(np.mean((result.predict(x_test, r.round) - np.sin(3 * x_test)) ** 2)))
        rows.append((r.round, f"{r.c:.3g}", f"{np.mean((r.y - y) ** 2):.4f}", f"{test_errors[-1]:.4f}"))
    rows.append((result.collapsed_at, "collapse", f"{np.mean(y ** 2):.4f}", f"{np.mean(np.sin(3 * x_test) ** 2):.4f}"))
    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plot_kernel(result, test_errors, output / "kernel_self_distillation.png")
    return table(rows, ("round", "c_t", "train MSE (labels)", "test MSE (sin 3x)")), {
        "collapsed_at": result.collapsed_at, "c": [r.c for r in result.rounds], "test_mse": test_errors}


def plot_kernel(result, test_errors, path, directions: int = 10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    top = slice(-1, -directions - 1, -1)  # eigenvalues ascend: the largest last
    index = np.arange(1, directions + 1)
    left.plot(index, np.abs(result.z0[top]), "k.-", label="labels")
    for r in result.rounds:
        left.plot(index, np.abs(r.z[top]), ".-", label=f"round {r.round}")
    left.set(yscale="log", xlabel="eigen-direction (largest eigenvalue first)", ylabel="|coefficient|",
             title="coefficients per eigen-direction")
    left.legend(fontsize="small")
    right.plot(range(1, len(test_errors) + 1), test_errors, "o-")
    right.set(xlabel="round", ylabel="test MSE against sin(3x)", title="test error per round")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**trainer_defaults("outputs/self_distillation"))
    if parser.parse_known_args(args=argv)[0].experiment == "weight-selection-text":
        parser.set_defaults(**TEXT_DEFAULTS)
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    try:
        DistillationConfig(**distillation_settings(example))
    except ValueError as error:
        parser.error(str(error))
    set_seed(training_args.seed)
    if example.experiment == "kernel":
        text, results = experiment_kernel(example, training_args)
    elif example.experiment == "weight-selection-text":
        text, results = experiment_weight_selection_text(example, training_args)
    else:
        train = digits("train", limit=example.max_train_samples)
        test = digits("test", limit=example.max_eval_samples)
        run = experiment_rounds if example.experiment == "rounds" else experiment_weight_selection
        text, results = run(example, training_args, train, test)
    if training_args.process_index == 0:
        print(text)
        output = Path(training_args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{example.experiment.replace('-', '_')}_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
