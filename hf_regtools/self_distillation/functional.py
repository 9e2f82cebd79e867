"""The distillation loss and the frozen teacher, without the Trainer.

In a custom loop:

```py
teacher = freeze_teacher(copy.deepcopy(model))            # or any model with the student's label space
with torch.no_grad():
    teacher_logits = teacher_logits_of(teacher, batch)
loss = distillation_loss(student_logits, teacher_logits, labels, loss="kl", temperature=2.0, alpha=0.5)
```
"""

from __future__ import annotations

import inspect

import torch

LOSSES = ("mse", "kl")


def validate_settings(loss: str, temperature: float, alpha: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"distillation loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the true labels) must be in [0, 1], got {alpha!r}")


def check_logits_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise a `ValueError` unless the teacher predicts what the student does (same shape: batch and label space)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"the teacher's logits have shape {tuple(teacher.shape)} but the student's {tuple(student.shape)}: "
            "distillation needs a teacher with the student's label space (the same num_labels / num_classes, in the "
            "same order) on the same inputs")


def per_example_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, loss: str = "mse",
                                  temperature: float = 1.0) -> torch.Tensor:
    """The distillation term of each example, in fp32: `"mse"`, the mean over outputs of `(s - t)^2` (the theory's
    square loss on the predictions), or `"kl"`, `T^2 KL(softmax(t / T) || softmax(s / T))` over the last axis."""
    check_logits_shapes(student_logits, teacher_logits)
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if loss == "mse":
        difference = (student - teacher).pow(2)
        return difference.reshape(len(difference), -1).mean(1) if difference.dim() > 1 else difference
    if loss == "kl":
        log_p_teacher = torch.log_softmax(teacher / temperature, dim=-1)
        log_p_student = torch.log_softmax(student / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        return temperature ** 2 * (kl.reshape(len(kl), -1).mean(1) if kl.dim() > 1 else kl)
    raise ValueError(f"distillation loss must be one of {LOSSES}, got {loss!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, loss: str = "mse", temperature: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """`(1 - alpha) * distillation + alpha * cross-entropy(student, labels)`, batch means, fp32.

    Args:
        student_logits (`torch.Tensor`): the student's outputs, `(batch, ...)`.
        teacher_logits (`torch.Tensor`): the teacher's, same shape (no gradient flows into them).
        labels (`torch.Tensor`, *optional*): class indices (`-100` ignored), needed when `alpha > 0`.
        loss (`str`, *optional*, defaults to `"mse"`): `"mse"` (the paper's square loss on predictions) or `"kl"`
            (soft targets at `temperature`, times `temperature^2`).
        temperature (`float`, *optional*, defaults to 1.0): the softmax temperature of `"kl"`.
        alpha (`float`, *optional*, defaults to 0.0): the weight of the true labels; 0 is the paper's pure-prediction
            setting.
    """
    validate_settings(loss, temperature, alpha)
    term = per_example_distillation_loss(student_logits, teacher_logits, loss=loss, temperature=temperature).mean()
    if alpha == 0.0:
        return term
    if labels is None:
        raise ValueError("distillation_loss with alpha > 0 needs labels (the true labels it mixes in)")
    ce = torch.nn.functional.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100)
    return (1.0 - alpha) * term + alpha * ce


def freeze_teacher(teacher: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """`teacher` (in place) in eval mode, without gradients (`requires_grad=False`), on `device` if given."""
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if device is not None:
        teacher.to(device)
    teacher.requires_grad_(False)
    return teacher.eval()


def _accepts(module: torch.nn.Module, names) -> tuple[bool, list[str]]:
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True, list(names)
    accepted = [name for name in names if name in parameters]
    return len(accepted) == len(list(names)), accepted


def logits_from_outputs(outputs) -> torch.Tensor:
    """The logits of a model's outputs: a tensor, a dict / `ModelOutput` with `"logits"`, or a tuple's first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"the model's outputs have no 'logits' (keys: {sorted(outputs)})")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in outputs of type {type(outputs).__name__}")


def teacher_logits_of(teacher: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The teacher's logits on a batch of model inputs (labels and loss keywords left out): called with the inputs as
    keywords when its `forward` takes them (transformers models, user modules), else with the single tensor input
    (a bare timm model's `forward(x)`)."""
    batch = {name: value for name, value in inputs.items() if name not in ("labels", "num_items_in_batch")}
    takes_all, accepted = _accepts(teacher, batch)
    if takes_all:
        return logits_from_outputs(teacher(**batch))
    tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        return logits_from_outputs(teacher(tensors[0]))
    raise ValueError(f"the teacher ({type(teacher).__name__}) takes none of the batch's inputs {sorted(batch)} as "
                     "keywords and there is more than one tensor to pass positionally; wrap it in a module whose "
                     "forward takes the student's inputs")
