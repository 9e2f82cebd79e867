"""A small transfer problem on scikit-learn's digits, for data selection by UOT + two-head fine-tuning.

Source ("pre-training") data: the digits of the training split under six class-specific transforms, one source class
per (transform, digit): 60 classes. Two transforms are close to the target task (`identity`, `shift`), four are far
(`rot90`, `rot180`, `invert`, `blur`). Target: the digits of the held-out test split with pixel noise, a few labelled
examples per class for fine-tuning, the rest for evaluation. A small ResNet is pre-trained on all source classes; then
it is fine-tuned on the target alone, with the UOT-selected source classes (`class_prototypes` +
`uot_select_classes`, two heads, `TwoStreamTrainerMixin`), or with as many randomly chosen source classes.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass

import torch

TRANSFORMS = ("identity", "shift", "rot90", "rot180", "invert", "blur")
CLOSE = ("identity", "shift")
SIDE = 16


def transform_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """`images` (N, 1, 8, 8, in [-1, 1]) under one of `TRANSFORMS`."""
    if name == "identity":
        return images
    if name == "shift":
        return torch.nn.functional.pad(images, (1, 0, 1, 0), value=-1.0)[..., :8, :8]
    if name == "rot90":
        return images.rot90(1, (2, 3))
    if name == "rot180":
        return images.rot90(2, (2, 3))
    if name == "invert":
        return -images
    if name == "blur":
        kernel = torch.ones(1, 1, 5, 5) / 25
        return torch.nn.functional.conv2d(torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0), kernel)
    raise ValueError(f"unknown transform {name!r}; choose one of {TRANSFORMS}")


def _resize(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)


def _dataset(images: torch.Tensor, labels: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"pixel_values": _resize(images).numpy(), "labels": labels.numpy()}).with_format("torch")


def source_dataset():
    """60 source classes: label `t * 10 + digit` for transform `TRANSFORMS[t]` (digits' training split)."""
    from .digits import digits_dataset, tensors

    images, digits = tensors(digits_dataset(split="train"))
    parts = [(transform_images(images, name), digits + 10 * t) for t, name in enumerate(TRANSFORMS)]
    return _dataset(torch.cat([p for p, _ in parts]), torch.cat([label for _, label in parts]))


def target_datasets(per_class: int, seed: int, noise: float = 0.25):
    """`(train, test)`: `per_class` labelled noisy digits per class from the test split, and the rest."""
    from .digits import digits_dataset, tensors

    images, labels = tensors(digits_dataset(split="test"))
    images = (images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(1234))).clamp(-1, 1)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                              generator=generator)[:per_class]]
                        for c in range(10)])
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[chosen] = False
    return _dataset(images[chosen], labels[chosen]), _dataset(images[rest], labels[rest])


def backbone(num_labels: int = 60):
    """A small transformers ResNet for 1 x 16 x 16 images."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64],
                                                     depths=[1, 1, 1], layer_type="basic", num_labels=num_labels,
                                                     downsample_in_first_stage=False))


def pretrain(source, *, steps: int = 300, batch_size: int = 128, seed: int = 0):
    from .digits import train_steps

    torch.manual_seed(seed)
    model = backbone()
    train_steps(model, source, steps=steps, batch_size=batch_size, lr=3e-3, weight_decay=1e-4, seed=seed)
    return model.eval()


@dataclass
class TransferResult:
    method: str
    seed: int
    accuracy: float
    selected: list[int]


def fine_tune(pretrained, target_train, target_test, source, selected: list[int] | None, *, seed: int,
              steps: int = 120, batch_size: int = 16, lambda_u: float = 0.3, learning_rate: float = 0.01,
              output_dir: str | None = None) -> float:
    """Test accuracy after two-head fine-tuning on the target (and the `selected` source classes; `None`: target
    only, `mu=0`)."""
    import copy

    from transformers import Trainer, TrainingArguments

    from ..data_selection import TwoHeadModel, TwoStreamTrainerMixin
    from .digits import evaluate

    class TwoStreamTrainer(TwoStreamTrainerMixin, Trainer):
        pass

    torch.manual_seed(seed)
    model = TwoHeadModel(copy.deepcopy(pretrained), 10, 60)
    if selected:
        wanted = set(selected)
        subset = source.filter(lambda labels: [int(v) in wanted for v in labels], input_columns="labels",
                               batched=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=output_dir or scratch, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=learning_rate, optim="sgd", weight_decay=1e-4, max_grad_norm=0.0,
                                 lr_scheduler_type="constant", logging_steps=steps, report_to="none", use_cpu=True,
                                 seed=seed, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        two_stream = {"source_dataset": subset, "mu": 1.0, "lambda_u": lambda_u} if selected else {"mu": 0.0}
        trainer = TwoStreamTrainer(model=model, args=args, train_dataset=target_train,
                                   two_stream={**two_stream, "head_lr_mult": 10.0})
        trainer.train()
    return evaluate(model.target_model(), target_test)[1]


def uot_selection(pretrained, source, target_train, n: int) -> list[int]:
    """The `n` source labels UOT selects between class prototypes of the pre-trained backbone."""
    from ..data_selection import class_prototypes, uot_select_classes

    source_prototypes = class_prototypes(pretrained, source, "labels", progress=False)
    target_prototypes = class_prototypes(pretrained, target_train, "labels", progress=False)
    selection = uot_select_classes(source_prototypes.prototypes, target_prototypes.prototypes, n)
    return [source_prototypes.labels[i] for i in selection.class_ids]


def run(seeds=(0, 1, 2), *, n_classes: int = 20, per_class: int = 5, pretrain_steps: int = 300,
        steps: int = 120) -> list[TransferResult]:
    """Every method on every seed (one pre-trained backbone)."""
    source = source_dataset()
    pretrained = pretrain(source, steps=pretrain_steps)
    results = []
    for seed in seeds:
        train, test = target_datasets(per_class, seed)
        chosen = uot_selection(pretrained, source, train, n_classes)
        randomly = random.Random(seed).sample(range(60), n_classes)
        for method, selected in (("target only", None), ("UOT-selected", chosen), ("random classes", randomly)):
            accuracy = fine_tune(pretrained, train, test, source, selected, seed=seed, steps=steps)
            results.append(TransferResult(method, seed, accuracy, selected or []))
    return results


def close_fraction(selected: list[int]) -> float:
    """Share of source labels whose transform is close to the target's (`CLOSE`)."""
    return sum(TRANSFORMS[label // 10] in CLOSE for label in selected) / len(selected)
