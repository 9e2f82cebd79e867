"""The `hf-regtools demo` job: weight selection next to random init, with `transformers.Trainer`, on digits.

Offline by default: a small ViT teacher is trained on digits 0-4, a narrower and shallower student is initialized
from it by weight selection, and that student, the same student from random init, that random init rescaled by
GradInit, and the selected student trained with early dropout and alpha-SVRG are fine-tuned on digits 5-9. With a network, `--teacher <hub id>` starts from a pretrained ViT or ConvNeXt instead (images are resized to
its input size).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_TEACHER = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128)
DEFAULT_STUDENT = dict(hidden_size=32, depth=2)
HUB_STUDENTS = {"isotropic": "vit-tiny", "hierarchical": "convnext-femto"}
VARIANT = "weight selection + early dropout + alpha-SVRG"
GRADINIT = "random init + GradInit"
GRADINIT_SETTINGS = dict(algorithm="adam", inner_lr=1e-3, gamma=math.inf, lr=2.5e-3, iterations=30)


@dataclass
class Run:
    name: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    seconds: float = 0.0


def _training_args(output_dir: Path, *, steps: int, seed: int, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=64,
                    per_device_eval_batch_size=256, learning_rate=1e-3, weight_decay=0.05, lr_scheduler_type="cosine",
                    warmup_steps=max(1, steps // 20), logging_steps=max(1, min(5, steps // 4)), save_strategy="no",
                    report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed, max_grad_norm=0.0)
    return TrainingArguments(**{**settings, **overrides})


def _fit(name: str, model, train, test, output_dir: Path, *, steps: int, seed: int, mixin=None, callbacks=(),
         **trainer_kwargs) -> Run:
    from transformers import Trainer

    from .testing.digits import accuracy
    from .trainer import RegtoolsTrainerMixin

    trainer_class = type("DemoTrainer", (mixin or RegtoolsTrainerMixin, Trainer), {})
    run, start = Run(name), time.perf_counter()
    trainer = trainer_class(model=model, args=_training_args(output_dir / "runs" / name, steps=steps, seed=seed),
                            train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                            callbacks=list(callbacks), **trainer_kwargs)
    trainer.train()
    run.seconds = time.perf_counter() - start
    run.losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate()
    run.test_loss, run.test_accuracy = metrics["eval_loss"], metrics["eval_accuracy"]
    return run


def run_demo(*, teacher: str | None = None, student=None, output_dir: str | Path = "outputs", steps: int = 150,
             seed: int = 0, teacher_steps: int = 250) -> dict[str, Run]:
    """Run the demo; returns the runs by name and writes the table, the plot and the student under `output_dir`.

    Args:
        teacher (`str`, *optional*): Hub id of a transformers ViT/ConvNeXt; default: train one on digits 0-4.
        student (*optional*): anything `initialize_student` takes as a student; default: half the default teacher's
            width and depth, or `vit-tiny` / `convnext-femto` for a Hub teacher.
    """
    from rich.console import Console
    from transformers import ViTConfig, ViTForImageClassification, set_seed

    from .adapters import detect_family, save_model
    from .hub import resolve_model
    from .testing.digits import digits_dataset, resized
    from .weight_selection import initialize_student

    console, output_dir = Console(), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = digits_dataset(range(5, 10), split="train"), digits_dataset(range(5, 10), split="test")
    runs: dict[str, Run] = {}

    if teacher is None:
        console.rule("1. Teacher: a ViT trained on digits 0-4")
        set_seed(seed)
        teacher_model = ViTForImageClassification(ViTConfig(num_labels=5, **DEFAULT_TEACHER))
        runs["teacher (digits 0-4)"] = _fit("teacher", teacher_model, digits_dataset(range(5), split="train"),
                                            digits_dataset(range(5), split="test"), output_dir, steps=teacher_steps,
                                            seed=seed)
        teacher_ref = output_dir / "teacher"
        save_model(teacher_model, teacher_ref)
        student_spec, overrides = (None, DEFAULT_STUDENT) if student is None else (student, {})
    else:
        console.rule(f"1. Teacher: {teacher} from the Hub")
        resolved = resolve_model(teacher)
        teacher_ref = teacher
        from .checkpoint import CheckpointReader

        layout = detect_family(CheckpointReader(resolved.folder), role="teacher", technique="weight_selection").layout
        if student is None and layout not in HUB_STUDENTS:
            raise ValueError("the demo fine-tunes a ViT or ConvNeXt student: pass a transformers ViT/ConvNeXt "
                             "teacher, or a student (--student)")
        student_spec, overrides = (HUB_STUDENTS[layout] if student is None else student), {}
        if resolved.library != "transformers":
            raise ValueError("the demo fine-tunes with transformers.Trainer: pass a transformers ViT/ConvNeXt teacher")
        config = resolved.config()
        size = config.get("image_size", 224)
        channels = config.get("num_channels", 3)
        train, test = resized(train, size, channels), resized(test, size, channels)

    console.rule("2. Weight selection")
    set_seed(seed)
    selected = initialize_student(teacher_ref, student_spec, num_labels=5, **overrides)
    console.print(str(selected.report))
    student_dir = selected.save(output_dir / "student", overwrite=True)
    console.print(f"student with its model card: {student_dir}")

    console.rule("3. Fine-tuning on digits 5-9: weight selection vs random init")
    set_seed(seed)
    random_student = type(selected.model)(selected.model.config)
    gradinit_student = copy.deepcopy(random_student)
    variant_student = copy.deepcopy(selected.model)
    runs["weight selection"] = _fit("weight_selection", selected.model, train, test, output_dir, steps=steps, seed=seed)
    runs["random init"] = _fit("random_init", random_student, train, test, output_dir, steps=steps, seed=seed)

    console.rule("4. Random init rescaled by GradInit (for the Adam step the fine-tuning takes)")
    from .gradinit import GradInitCallback

    runs[GRADINIT] = _fit("random_init_gradinit", gradinit_student, train, test, output_dir, steps=steps, seed=seed,
                          callbacks=[GradInitCallback(**GRADINIT_SETTINGS)])

    console.rule("5. Weight selection + early dropout + alpha-SVRG")
    from .alpha_svrg import AlphaSVRGTrainerMixin
    from .dropout_schedules import EarlyDropoutCallback

    runs[VARIANT] = _fit("ws_early_dropout_alpha_svrg", variant_student, train, test, output_dir, steps=steps,
                         seed=seed, mixin=AlphaSVRGTrainerMixin,
                         callbacks=[EarlyDropoutCallback(p=0.1, cutoff_fraction=1 / 6)],
                         alpha_svrg={"alpha0": 0.75, "kind": "linear"})

    _print_table(console, runs, steps)
    plot = _plot(runs, output_dir / "weight_selection_loss.png")
    console.print(f"loss curves: {plot}")
    return runs


def _print_table(console, runs: dict[str, Run], steps: int) -> None:
    from rich.table import Table

    table = Table(title=f"digits 5-9 after {steps} fine-tuning steps")
    for column in ("model", "final train loss", "test loss", "test accuracy", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, run in runs.items():
        table.add_row(name, f"{run.losses[-1][1]:.3f}", f"{run.test_loss:.3f}", f"{run.test_accuracy:.3f}",
                      f"{run.seconds:.1f}")
    console.print(table)


def _plot(runs: dict[str, Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in ("weight selection", "random init", GRADINIT, VARIANT):
        steps, losses = zip(*runs[name].losses)
        axis.plot(steps, losses, label=name)
    axis.set(xlabel="optimizer step", ylabel="training loss", title="Fine-tuning a ViT student on digits 5-9")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
