"""Label-noise SGD (Damian, Ma and Lee, NeurIPS 2021) with the Trainer, and the sharpness it is meant to lower.

Trains a small image classifier (`--model mlp`, default, or one of the models of `_digits.MODELS`, or a Hub id) on
scikit-learn's handwritten digits (offline) with labels perturbed afresh at every step:
`--kind flip --p 0.2` replaces each label by a uniform class with probability p (cross-entropy);
`--kind soft_mse --sigma 1.0` adds +-sigma (or Gaussian, `--noise gaussian`) to the one-hot targets (square loss);
`--kind none` is the baseline without noise. The noise goes in through `Trainer(compute_loss_func=...)`; evaluation sees
clean labels. Every `--probe_steps` steps the sharpness of the clean training loss (Hessian trace by Hutchinson, top
Hessian eigenvalue by power iteration, `SharpnessCallback`) is logged next to the gradient-variance diagnostics
(`GradientDiagnosticsCallback`); both are drawn into `sharpness.png`, and the last values saved in
`sharpness_results.json` and `all_results.json` (`eval_hessian_trace`, `eval_hessian_top_eigenvalue`).

One process (CPU or GPU):

    python examples/label_noise.py --kind soft_mse --sigma 1.0
    python examples/label_noise.py --kind none --output_dir outputs/label_noise_baseline

Several processes (DDP; on CPU give each process one thread; every process count draws the same noise):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/label_noise.py

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from _digits import MODELS, DigitsMLP, accuracy, build_model, digits, train_and_evaluate, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools import (SHARPNESS_KEYS, GradientDiagnosticsCallback, RegtoolsTrainerMixin, SharpnessCallback,
                         label_noise_loss, plot_diagnostics)
from hf_regtools.diagnostics.plot import DEFAULT_KEYS


@dataclass
class ExampleArguments:
    model: str = field(default="mlp", metadata={"help": f"mlp, one of {MODELS}, or a Hub id / folder"})
    kind: str = field(default="soft_mse", metadata={"help": "label noise", "choices": ("flip", "soft_mse", "none")})
    p: float = field(default=0.2, metadata={"help": "replacement probability (flip)"})
    sigma: float = field(default=1.0, metadata={"help": "noise scale on the one-hot targets (soft_mse)"})
    noise: str = field(default="rademacher", metadata={"help": "soft_mse noise", "choices": ("rademacher",
                                                                                             "gaussian")})
    probe_steps: int = field(default=50, metadata={"help": "sharpness and gradient diagnostics every N steps"})
    probes: int = field(default=8, metadata={"help": "Hutchinson probe vectors per measurement"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class LabelNoiseTrainer(RegtoolsTrainerMixin, Trainer):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/label_noise"), "optim": "sgd", "learning_rate": 0.1,
                           "weight_decay": 0.0, "lr_scheduler_type": "constant", "num_train_epochs": 30})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    if example.model == "mlp":
        model, size, channels = DigitsMLP(64, hidden=1, activation=torch.nn.Tanh), 8, 1
    else:
        model, size, channels = build_model(example.model)
    train = digits("train", image_size=size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=size, channels=channels, limit=example.max_eval_samples)
    callbacks = [GradientDiagnosticsCallback(every_n_steps=example.probe_steps, n_batches=4),
                 SharpnessCallback(every_n_steps=example.probe_steps, n_probes=example.probes, power_iterations=20)]
    loss = None
    if example.kind != "none":
        try:
            loss = label_noise_loss(example.kind, num_classes=10, **(
                {"p": example.p} if example.kind == "flip" else {"sigma": example.sigma, "noise": example.noise}))
        except ValueError as error:
            parser.error(str(error))
        callbacks.append(loss)
    trainer = LabelNoiseTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                compute_metrics=accuracy, compute_loss_func=loss, callbacks=callbacks)
    train_and_evaluate(trainer, training_args)

    sharpness = next(callback for callback in trainer.callback_handler.callbacks
                     if isinstance(callback, SharpnessCallback))
    metrics = {f"eval_{key.rsplit('/', 1)[-1]}": value for key, value in sharpness.measure(trainer.model).items()}
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("sharpness", metrics)
    if trainer.is_world_process_zero():
        plot_diagnostics({example.kind: trainer.state.log_history}, os.path.join(training_args.output_dir,
                                                                                 "sharpness.png"),
                         keys=(*SHARPNESS_KEYS, *DEFAULT_KEYS))


if __name__ == "__main__":
    main()
