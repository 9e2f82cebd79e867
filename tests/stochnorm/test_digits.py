"""Small real-data reproduction of the paper's claim: StochNorm helps fine-tuning a pretrained BatchNorm CNN on
little data.

A 3-convolution BatchNorm CNN is pre-trained on the digits 0-4 (all their training images, 200 SGD steps), then
fine-tuned onto the digits 5-9 from 10 training images per class (a new head; the official recipe scaled down: SGD
Nesterov, momentum 0.9, weight decay 5e-4, backbone lr 0.01, head lr x10 with N(0, 0.01) init, lr x0.1 after 2/3 of
the 150 steps, batch 10), with plain BatchNorm and with StochNorm (p 0.5 in every layer), 5 seeds (each: another
10-per-class subset, head init and mask draw; the same data order for both arms). Scored by test accuracy on the
digits 5-9 (held-out split).

Measured (5 seeds): test accuracy 0.939 with StochNorm vs 0.912 with BatchNorm (better in 4 seeds, equal in 1). Not
robust: the same protocol with a backbone twice as wide (16-32-64 channels, 300 pre-training steps) gave 0.942 vs
0.952 (better in 1 seed). So the test asserts only that StochNorm costs no more than `TOLERANCE` of mean accuracy; the
numbers are in the method card ("Measured here").
"""

import statistics

import pytest
import torch
from torch import nn

from hf_regtools.stochnorm import apply_stochnorm
from hf_regtools.testing.digits import digits_dataset, tensors

SEEDS = range(5)
PER_CLASS, STEPS, BATCH = 10, 150, 10
PRETRAIN_STEPS, WIDTH = 200, 32
SOURCE, TARGET = range(5), range(5, 10)
TOLERANCE = 0.02


def backbone() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 8), *block(8, 16), nn.MaxPool2d(2), *block(16, WIDTH), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def pretrain() -> nn.Sequential:
    torch.manual_seed(0)
    features, head = backbone(), nn.Linear(WIDTH, len(SOURCE))
    model = nn.Sequential(features, head)
    images, labels = tensors(digits_dataset(SOURCE, split="train"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_STEPS):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return features


def few_shot_subset(seed: int):
    images, labels = tensors(digits_dataset(TARGET, split="train"))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                            generator=generator)[:PER_CLASS]]
                        for c in range(len(TARGET))])
    return images[chosen], labels[chosen]


def fine_tune_accuracy(pretrained: nn.Sequential, seed: int, stochnorm: bool, test) -> float:
    import copy

    images, labels = few_shot_subset(seed)
    torch.manual_seed(seed)
    features = copy.deepcopy(pretrained)
    head = nn.Linear(WIDTH, len(TARGET))
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    if stochnorm:
        apply_stochnorm(features, p=0.5)
    model = nn.Sequential(features, head)
    optimizer = torch.optim.SGD([{"params": features.parameters()}, {"params": head.parameters(), "lr": 0.1}],
                                lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [STEPS * 2 // 3], gamma=0.1)
    order = torch.Generator().manual_seed(seed)
    model.train()
    permutation, position = torch.randperm(len(labels), generator=order), 0
    for _ in range(STEPS):
        if position + BATCH > len(labels):
            permutation, position = torch.randperm(len(labels), generator=order), 0
        batch = permutation[position:position + BATCH]
        position += BATCH
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    test_images, test_labels = test
    with torch.no_grad():
        return (model(test_images).argmax(-1) == test_labels).float().mean().item()


def measure() -> tuple[list[float], list[float]]:
    torch.set_num_threads(1)
    pretrained = pretrain()
    test = tensors(digits_dataset(TARGET, split="test"))
    plain = [fine_tune_accuracy(pretrained, seed, False, test) for seed in SEEDS]
    stoch = [fine_tune_accuracy(pretrained, seed, True, test) for seed in SEEDS]
    return plain, stoch


@pytest.mark.slow
def test_stochnorm_fine_tuning_on_ten_digits_per_class():
    plain, stoch = measure()
    assert statistics.mean(stoch) >= statistics.mean(plain) - TOLERANCE, (plain, stoch)


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    plain, stoch = measure()
    print("batchnorm", [round(a, 3) for a in plain], round(statistics.mean(plain), 4))
    print("stochnorm", [round(a, 3) for a in stoch], round(statistics.mean(stoch), 4))
    print(f"{time.perf_counter() - start:.1f} s")
