"""The patch diagnostic at digits scale: a small network on scikit-learn's 8x8 digits with the class-dependent patch,
trained with a large initial learning rate (then annealed) or a small one, without the Trainer (fast; for the tests
and the method card's figures)."""

from __future__ import annotations

import torch

from .functional import large_initial_lr_lambda
from .trainer import PatchTransform, patch_only_eval_set

DIGITS_PATCH = dict(num_classes=10, patch=3, channels=1, z_scale=1.25, sep=0.1)


def digits_mlp(width: int = 256) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))


def train_patched_digits(lr: float, milestones: tuple = (), factors: tuple = (), *, epochs: int = 30,
                         seed: int = 0, batch_size: int = 128, weight_decay: float = 5e-4,
                         patch_seed: int = 2, **patch_kwargs) -> list[dict]:
    """Train `digits_mlp` with SGD (Nesterov, momentum 0.9) at peak `lr`, annealed by `factors` at the 1-based epoch
    `milestones`, on patched digits; per epoch: clean test accuracy, patched test accuracy and patch-only accuracy."""
    from ..testing.digits import digits_dataset, tensors

    torch.manual_seed(seed)
    transform = PatchTransform(**{**DIGITS_PATCH, **patch_kwargs}, seed=patch_seed)
    train_x, train_y = tensors(digits_dataset(split="train"))
    test_x, test_y = tensors(digits_dataset(split="test"))
    patched_test, _ = transform.patch(test_x, test_y, range(len(test_y)), epoch=0, seed=patch_seed + 1)
    only_x, only_y = patch_only_eval_set(transform, n=1000, image_shape=(1, 8, 8), seed=seed)
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = -(-len(train_y) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, large_initial_lr_lambda(steps, milestones, factors))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        transform.set_epoch(epoch)
        images, _ = transform.patch(train_x, train_y, range(len(train_y)))
        model.train()
        for batch in torch.randperm(len(train_y), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            accuracy = lambda x, y: (model(x).argmax(-1) == y).float().mean().item()  # noqa: E731
            history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                            "clean": accuracy(test_x, test_y), "patched": accuracy(patched_test, test_y),
                            "patch_only": accuracy(only_x, only_y)})
    return history
