"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as `datasets.Dataset`s, and a tiny trainer.

The digits ship with scikit-learn, so demos and small reproductions run offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def digits_dataset(classes: Sequence[int] | None = None, *, split: str | None = None, test_fraction: float = 0.2,
                   seed: int = 0):
    """The digits as a `datasets.Dataset` with `pixel_values` (1x8x8 floats in [-1, 1]) and `labels`.

    Args:
        classes (`Sequence[int]`, *optional*): keep these digits only; labels are renumbered `0..len(classes)-1`
            in the given order.
        split (`str`, *optional*): `"train"` or `"test"`: a fixed stratified split; `None` keeps all images.
        test_fraction (`float`, *optional*, defaults to 0.2): share of the test split.
        seed (`int`, *optional*, defaults to 0): seed of the split.
    """
    import numpy as np
    from datasets import Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype("float32") / 16.0 - 0.5) / 0.5
    targets = digits.target
    classes = list(range(10)) if classes is None else list(classes)
    keep = np.isin(targets, classes)
    images, targets = images[keep], targets[keep]
    labels = np.array([classes.index(t) for t in targets], dtype="int64")
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                       stratify=labels)
        chosen = train if split == "train" else test
        images, labels = images[chosen], labels[chosen]
    dataset = Dataset.from_dict({"pixel_values": images[:, None], "labels": labels})
    return dataset.with_format("torch")


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pixel_values, labels)` of a digits dataset as two tensors."""
    columns = dataset[:]
    return columns["pixel_values"], columns["labels"]


def logits_of(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a timm or transformers image classifier."""
    if type(model).__module__.startswith("transformers."):
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


def train_steps(model: torch.nn.Module, dataset, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
                weight_decay: float = 0.05, seed: int = 0) -> list[float]:
    """Train with AdamW on shuffled mini-batches for `steps` steps; returns the training loss of every step."""
    images, labels = tensors(dataset)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        order, position = torch.randperm(len(labels), generator=generator), 0
        for _ in range(steps):
            if position + batch_size > len(labels):
                order, position = torch.randperm(len(labels), generator=generator), 0
            yield order[position:position + batch_size]
            position += batch_size

    return adamw_steps(model, batches(), lambda batch: torch.nn.functional.cross_entropy(
        logits_of(model, images[batch]), labels[batch]), lr=lr, weight_decay=weight_decay)


def adamw_steps(model: torch.nn.Module, batches, loss_of, *, lr: float, weight_decay: float) -> list[float]:
    """One AdamW step (in train mode) on `loss_of(batch)` for every batch; returns every step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for batch in batches:
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset) -> tuple[float, float]:
    """`(mean cross-entropy, accuracy)` of `model` on `dataset`."""
    images, labels = tensors(dataset)
    model.eval()
    logits = logits_of(model, images)
    return (torch.nn.functional.cross_entropy(logits, labels).item(),
            (logits.argmax(-1) == labels).float().mean().item())


def resized(dataset, image_size: int, channels: int):
    """The digits resized to a model's input size and channel count, on the fly (a `set_transform`)."""
    def transform(batch):
        pixels = torch.stack([torch.as_tensor(p) for p in batch["pixel_values"]])
        pixels = torch.nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
        return {"pixel_values": pixels.expand(-1, channels, -1, -1), "labels": torch.as_tensor(batch["labels"])}

    dataset = dataset.with_format(None)
    dataset.set_transform(transform)
    return dataset


def accuracy(prediction) -> dict[str, float]:
    """`compute_metrics` for the Trainer: top-1 accuracy."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}
