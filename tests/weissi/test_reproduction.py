"""WEISSI against weight decay on real data (scikit-learn's digits), 3 seeds, asserted on the mean.

A ReLU MLP (64-256-256-10) trained on 300 training images for 20 epochs (SGD momentum 0.9, lr 0.05, batch 64),
tested on the 360 test images. Measured (means over seeds 0-2): weight decay 5e-4: accuracy 0.9315, input-gradient
norm of the loss 0.583, product-of-norms bound 15.3; WEISSI (lambda1 0.3, lambda2 1e-3, no weight decay): 0.9269,
0.479, 7.3. The robustness side of the paper's claim (a lower input gradient) holds; the accuracy gain does not at
this scale (WEISSI is 0.5 points below), so only "within 2 points" is asserted.
"""

import torch

from hf_regtools.testing.digits import digits_dataset, tensors
from hf_regtools.weissi import WeissiRegularizer, input_gradient_norm, product_of_norms_bound, weissi_param_groups

SEEDS = (0, 1, 2)
TRAIN_IMAGES, EPOCHS, BATCH = 300, 20, 64


def mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def train_and_measure(regularizer: str, seed: int, data) -> tuple[float, float, float]:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = mlp()
    if regularizer == "weight_decay":
        penalty = None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        penalty = WeissiRegularizer(model, lambda1=0.3, lambda2=1e-3)
        optimizer = torch.optim.SGD(weissi_param_groups(model, 0.0, regularizer=penalty), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    gradient = input_gradient_norm(model, x_test, y_test, output="loss").mean().item()
    return accuracy, gradient, product_of_norms_bound(model).item()


def test_weissi_lowers_the_input_gradient_at_the_accuracy_of_weight_decay():
    x_train, y_train = tensors(digits_dataset(split="train"))
    data = ((x_train[:TRAIN_IMAGES], y_train[:TRAIN_IMAGES]), tensors(digits_dataset(split="test")))
    means = {}
    for regularizer in ("weight_decay", "weissi"):
        runs = torch.tensor([train_and_measure(regularizer, seed, data) for seed in SEEDS])
        means[regularizer] = runs.mean(0)
    (wd_accuracy, wd_gradient, wd_bound), (accuracy, gradient, bound) = means["weight_decay"], means["weissi"]
    assert wd_accuracy > 0.9, means
    assert accuracy > wd_accuracy - 0.02, means
    assert gradient < 0.9 * wd_gradient, means
    assert bound < 0.75 * wd_bound, means
