"""Small real-data reproduction on scikit-learn's digits: a BatchNorm CNN trained with weight rescaling vs weight decay.

The protocol (fixed before measuring): three conv-BN-ReLU layers (16, 32, 32 filters, no conv bias), average pool,
linear head; 5 epochs of batch 64 on the 1,437 training digits, cosine LR; weight decay 5e-4 on every parameter for
the baseline; for WRS the same 5e-4 on the unmanaged parameters only (`wrs_param_groups`: the head's weight) and every
conv filter rescaled to norm 1 after each step (and once at the start). Test accuracy on the 360 test digits, mean of
3 seeds. All measured numbers are in the method card ("Measured here"). The paper claims WRS is at least as good as
WD and more robust to hyperparameters; what reproduces here is the first at each optimizer's best learning rate, not
the robustness (WRS at r = 1 lowers the effective LR of PyTorch's initialization, whose filter norms are 1/sqrt(3)).
"""

import pytest
import torch
from torch import nn

from hf_regtools.testing.digits import digits_dataset, tensors
from hf_regtools.weight_rescaling import find_scale_invariant_pairs, rescale_weights_, wrs_param_groups

SEEDS = (0, 1, 2)
EPOCHS, BATCH, WEIGHT_DECAY = 5, 64, 5e-4


@pytest.fixture(scope="module")
def digits():
    return tensors(digits_dataset(split="train")), tensors(digits_dataset(split="test"))


def bn_cnn(width=16):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                         nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, 10))


def train(digits, *, optimizer: str, regularizer: str, lr: float, seed: int) -> tuple[float, float]:
    """Test accuracy and the mean filter norm of the managed convolutions at the end."""
    (x, y), (x_test, y_test) = digits
    torch.manual_seed(seed)
    model = bn_cnn()
    pairs = find_scale_invariant_pairs(model)
    if regularizer == "wrs":
        groups = wrs_param_groups(model, WEIGHT_DECAY, pairs=pairs)
        rescale_weights_(pairs)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": WEIGHT_DECAY}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9) if optimizer == "sgdm" else torch.optim.Adam(groups, lr=lr)
    steps_per_epoch = len(y) // BATCH
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * BATCH:(step + 1) * BATCH]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            if regularizer == "wrs":
                rescale_weights_(pairs)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    norm = torch.cat([pair.weight.detach().flatten(1).norm(dim=1) for pair in pairs]).mean().item()
    return accuracy, norm


def mean_accuracy(digits, **settings):
    runs = [train(digits, seed=seed, **settings) for seed in SEEDS]
    return sum(acc for acc, _ in runs) / len(runs), [norm for _, norm in runs]


def test_sgd_momentum_standard_recipe_wrs_is_as_good_as_weight_decay(digits):
    """SGD momentum 0.9, lr 0.1, wd 5e-4 (the usual CIFAR ResNet recipe). Measured: WD 0.984, WRS 0.982."""
    wd, wd_norms = mean_accuracy(digits, optimizer="sgdm", regularizer="wd", lr=0.1)
    wrs, wrs_norms = mean_accuracy(digits, optimizer="sgdm", regularizer="wrs", lr=0.1)
    assert wd > 0.95 and wrs > 0.95
    assert wrs >= wd - 0.02
    assert all(abs(norm - 1.0) < 1e-5 for norm in wrs_norms)
    assert all(abs(norm - 1.0) > 0.1 for norm in wd_norms)  # under WD the norm, hence the effective LR, drifts


def test_adam_at_each_methods_best_learning_rate_wrs_is_as_good_as_weight_decay(digits):
    """Adam (L2 5e-4) at lr 1e-3 and 1e-2, each method at its best of the two. Measured: WD 0.982 (1e-2), WRS 0.985
    (1e-2); at 1e-3 WRS is behind (0.849 vs 0.896), see the method card."""
    best = {regularizer: max(mean_accuracy(digits, optimizer="adam", regularizer=regularizer, lr=lr)[0]
                             for lr in (1e-3, 1e-2)) for regularizer in ("wd", "wrs")}
    assert best["wd"] > 0.95
    assert best["wrs"] >= best["wd"] - 0.02
