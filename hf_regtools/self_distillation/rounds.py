"""`run_self_distillation`: rounds of training, each learning from the previous round's model, resumable.

Layout of `output_dir`: one folder per round, `round-1`, `round-2`, ...; each holds the round's Trainer checkpoints
(`checkpoint-*`, if the Trainer saves any), its final model (`save_round_model`: `model.safetensors` and, for
transformers models, `config.json`, loadable with `from_pretrained`; a timm model in `TimmWrapperForImageClassification`
in timm's format, loadable with `timm.create_model("local-dir:<folder>", pretrained=True)` and `from_pretrained`),
`trainer_state.json` (its log history) and, once the round is complete, `round.json` (its metrics). A rerun skips the
complete rounds, takes the last one's model as the teacher, and resumes an incomplete round from its last checkpoint
(`trainer.train(resume_from_checkpoint=...)`), so an interrupted run ends with the same weights as an uninterrupted
one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

INITS = ("fresh", "warm")
ROUND_FILE = "round.json"


@dataclass
class RoundResult:
    """One finished round: its number, folder, training and evaluation metrics, and whether this call ran it (or
    found it complete on disk) or resumed it from a checkpoint."""

    round: int
    output_dir: Path
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    status: str = "trained"  # "trained", "resumed" or "found"


def round_dir(output_dir: str | os.PathLike, round: int) -> Path:
    return Path(output_dir) / f"round-{round}"


def load_round_model(model_init: Callable, folder: str | os.PathLike):
    """The model saved in a round's folder: `from_pretrained` for transformers models, else `model_init()` with the
    saved `model.safetensors` loaded (strictly)."""
    from safetensors.torch import load_file

    model = model_init()
    folder = Path(folder)
    if hasattr(type(model), "from_pretrained") and (folder / "config.json").is_file():
        return type(model).from_pretrained(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"round folder {folder} holds no model.safetensors; was the round saved?")
    model.load_state_dict(load_file(weights), strict=True)
    return model


def save_round_model(trainer, folder: str | os.PathLike) -> None:
    """Save the round's model with `trainer.save_model(folder)`; a timm model in transformers'
    `TimmWrapperForImageClassification` is then rewritten in timm's own format (`config.json` with `model_args`),
    which both `timm.create_model("local-dir:<folder>", pretrained=True)` and `from_pretrained` load."""
    trainer.save_model(str(folder))
    model = trainer.model
    if type(model).__name__ == "TimmWrapperForImageClassification" and trainer.is_world_process_zero():
        from ..adapters import timm as timm_adapter

        timm_adapter.save(model.timm_model, folder)


def _last_checkpoint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder))


def _json_ready(metrics: dict) -> dict:
    return {name: float(value) if hasattr(value, "__float__") else value for name, value in metrics.items()}


def run_self_distillation(model_init: Callable, trainer_factory: Callable, *, rounds: int,
                          output_dir: str | os.PathLike, init: str = "fresh", teacher=None, seed: int = 0,
                          evaluate: bool = True, resume: bool = True) -> list[RoundResult]:
    """Train `rounds` rounds; round `t + 1` distills from round `t`'s model (frozen, eval mode, no gradients).

    Args:
        model_init (`callable`): `model_init() -> model`, a fresh student (called after `transformers.set_seed(seed +
            t - 1)` for round `t`, so every round starts from its own fixed initialization).
        trainer_factory (`callable`): `trainer_factory(model, teacher, *, round, output_dir) -> Trainer`, a Trainer
            with `DistillationTrainerMixin` built on `model` with `teacher=teacher` (and `distillation_round=round`),
            writing to `output_dir` (the round's folder). `teacher` is `None` in round 1 unless given below.
        rounds (`int`): the number of rounds.
        output_dir (`str` or `os.PathLike`): where the round folders go.
        init (`str`, *optional*, defaults to `"fresh"`): `"fresh"`: each round from `model_init()`; `"warm"`: from
            a copy of the previous round's model.
        teacher (`torch.nn.Module`, *optional*): round 1's teacher (knowledge distillation from another model);
            by default round 1 learns from the true labels.
        seed (`int`, *optional*, defaults to 0): the base seed of the initializations.
        evaluate (`bool`, *optional*, defaults to `True`): run `trainer.evaluate()` after each round when the
            Trainer has an `eval_dataset`.
        resume (`bool`, *optional*, defaults to `True`): skip complete rounds and resume an incomplete one from its
            last checkpoint; `False` refuses an `output_dir` that holds rounds already.

    Returns:
        `list[RoundResult]`, one per round.
    """
    from transformers import set_seed

    from .trainer import DistillationTrainerMixin

    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not callable(model_init) or not callable(trainer_factory):
        raise TypeError("run_self_distillation(model_init, trainer_factory, ...) takes two callables")
    output_dir = Path(output_dir)
    if not resume and any(round_dir(output_dir, t).exists() for t in range(1, rounds + 1)):
        raise FileExistsError(f"{output_dir} holds rounds already; pass resume=True to continue them or choose "
                              "another output_dir")

    results: list[RoundResult] = []
    previous: Path | None = None
    for t in range(1, rounds + 1):
        folder = round_dir(output_dir, t)
        if (folder / ROUND_FILE).is_file():
            record = json.loads((folder / ROUND_FILE).read_text())
            results.append(RoundResult(t, folder, record.get("train", {}), record.get("eval", {}), status="found"))
            previous = folder
            continue
        round_teacher = teacher if previous is None else load_round_model(model_init, previous)
        set_seed(seed + t - 1)
        model = model_init() if init == "fresh" or previous is None else load_round_model(model_init, previous)
        if init == "warm" and previous is not None:
            model.train().requires_grad_(True)
        trainer = trainer_factory(model, round_teacher, round=t, output_dir=str(folder))
        if not isinstance(trainer, DistillationTrainerMixin):
            raise TypeError(f"trainer_factory returned a {type(trainer).__name__}; it must return a Trainer with "
                            "DistillationTrainerMixin (class T(DistillationTrainerMixin, Trainer))")
        if round_teacher is not None and trainer.teacher is not round_teacher:
            raise ValueError(f"round {t}: the Trainer from trainer_factory does not distill from the teacher it was "
                             "given; build it with teacher=teacher")
        if Path(trainer.args.output_dir).resolve() != folder.resolve():
            raise ValueError(f"round {t}: the Trainer writes to {trainer.args.output_dir}, not to the round's folder "
                             f"{folder}; build its TrainingArguments with output_dir=output_dir")
        checkpoint = _last_checkpoint(folder) if resume else None
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
        save_round_model(trainer, folder)
        trainer.save_state()
        eval_metrics = trainer.evaluate() if evaluate and trainer.eval_dataset is not None else {}
        train_metrics = _json_ready(train_output.metrics)
        eval_metrics = _json_ready(eval_metrics)
        if trainer.is_world_process_zero():
            record = {"round": t, "init": init, "resumed_from": checkpoint, "train": train_metrics,
                      "eval": eval_metrics}
            (folder / ROUND_FILE).write_text(json.dumps(record, indent=2))
        trainer.accelerator.wait_for_everyone()
        results.append(RoundResult(t, folder, train_metrics, eval_metrics,
                                   status="resumed" if checkpoint else "trained"))
        previous = folder
    return results
