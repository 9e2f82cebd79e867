"""The functional core of label-noise SGD: noise statistics, keying, masking, the loss (spec §7 tests 1-3)."""

from types import SimpleNamespace

import pytest
import torch

from hf_regtools.label_noise import LabelNoiseConfig, LabelNoiseLoss, label_noise_loss_value, noisy_targets

N = 200_000


def regression(noise="rademacher", sigma=0.7):
    return LabelNoiseConfig(kind="regression", sigma=sigma, noise=noise)


def test_rademacher_noise_is_plus_minus_sigma_with_mean_zero():
    labels = torch.randn(N, dtype=torch.float64)
    eps = noisy_targets(labels, regression(), seed=0, step=3) - labels
    assert torch.allclose(eps.abs(), torch.full_like(eps, 0.7))
    assert abs(float(eps.mean())) < 4 * 0.7 / N ** 0.5
    assert float((eps > 0).double().mean()) == pytest.approx(0.5, abs=4 * 0.5 / N ** 0.5)


def test_gaussian_noise_mean_and_scale():
    labels = torch.zeros(N, 2, dtype=torch.float64)
    eps = noisy_targets(labels, regression("gaussian", 0.3), seed=1, step=0)
    assert abs(float(eps.mean())) < 4 * 0.3 / (2 * N) ** 0.5
    assert float(eps.std()) == pytest.approx(0.3, rel=4 * (0.5 / (2 * N)) ** 0.5)


def test_soft_mse_noise_is_added_to_one_hot_targets():
    config = LabelNoiseConfig(kind="soft_mse", sigma=0.5, num_classes=4)
    labels = torch.randint(0, 4, (N // 4,), generator=torch.Generator().manual_seed(0))
    targets = noisy_targets(labels, config, seed=0, step=1, dtype=torch.float64)
    eps = targets - torch.nn.functional.one_hot(labels, 4).double()
    assert torch.allclose(eps.abs(), torch.full_like(eps, 0.5))
    assert abs(float(eps.mean())) < 4 * 0.5 / eps.numel() ** 0.5


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_rate_per_class(p):
    # replacement by a uniform class (possibly the same): E[one_hot(y')] = (1 - p) one_hot(y) + p / K per class
    K = 5
    config = LabelNoiseConfig(kind="flip", p=p, num_classes=K)
    labels = torch.arange(N) % K
    flipped = noisy_targets(labels, config, seed=2, step=7)
    for k in range(K):
        mine = flipped[labels == k]
        frequencies = torch.bincount(mine, minlength=K).double() / len(mine)
        expected = torch.full((K,), p / K, dtype=torch.float64)
        expected[k] += 1 - p
        assert torch.allclose(frequencies, expected, atol=4 * (0.25 / len(mine)) ** 0.5), (k, frequencies)


def test_regression_gradient_averaged_over_both_signs_is_the_clean_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    eps = noisy_targets(y, regression(), seed=0, step=0) - y

    def gradient(targets):
        return torch.autograd.grad(label_noise_loss_value(x @ w, targets, regression(), noisy=False), w)[0]

    average = (gradient(y + eps) + gradient(y - eps)) / 2
    torch.testing.assert_close(average, gradient(y), rtol=1e-12, atol=1e-12)


def test_noise_is_fresh_each_step_and_reproducible_by_seed():
    labels = torch.zeros(64)
    draw = lambda seed, step: noisy_targets(labels, regression(), seed=seed, step=step)  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))


@pytest.mark.parametrize("config", [regression("gaussian"), LabelNoiseConfig(kind="flip", p=0.5, num_classes=3),
                                    LabelNoiseConfig(kind="soft_mse", sigma=1.0, num_classes=3)],
                         ids=lambda c: c.kind)
def test_the_noise_of_a_row_does_not_depend_on_how_the_global_batch_is_split(config):
    labels = torch.randint(0, 3, (16, 5))
    labels = labels.float() if config.kind == "regression" else labels
    whole = noisy_targets(labels, config, seed=3, step=2, total=16)
    parts = torch.cat([noisy_targets(labels[i:i + 4], config, seed=3, step=2, offset=i, total=16)
                       for i in range(0, 16, 4)])
    assert torch.equal(whole, parts)


def loss_with(world_size, rank, batch, accumulation):
    loss = LabelNoiseLoss(LabelNoiseConfig(kind="flip", p=0.5, num_classes=3))
    args = SimpleNamespace(seed=11, train_batch_size=batch, world_size=world_size, process_index=rank,
                           gradient_accumulation_steps=accumulation)
    loss.on_train_begin(args, SimpleNamespace(global_step=4), None)
    return loss


def test_one_process_two_processes_and_accumulation_give_the_same_rows():
    # Accelerate hands process r of W the sampler's batch m * W + r at micro-batch m
    one = loss_with(1, 0, 8, 1)
    assert one.rows(8) == (0, 8)
    for rank in (0, 1):
        assert loss_with(2, rank, 4, 1).rows(4) == (4 * rank, 8)
    accumulated = loss_with(1, 0, 4, 2)
    assert accumulated.rows(4) == (0, 8)
    accumulated.micro_batch = 1
    assert accumulated.rows(4) == (4, 8)
    both = loss_with(2, 1, 2, 2)
    both.micro_batch = 1
    assert both.rows(2) == (6, 8)  # micro-batch 1 of process 1 is the sampler's batch 3
    with pytest.raises(ValueError, match="exhausted"):
        accumulated.micro_batch = 2
        accumulated.rows(4)


@pytest.mark.parametrize("config", [regression("gaussian"), LabelNoiseConfig(kind="flip", p=1.0, num_classes=3),
                                    LabelNoiseConfig(kind="soft_mse", sigma=1.0, num_classes=3)],
                         ids=lambda c: c.kind)
def test_ignored_labels_are_never_altered_and_never_counted(config):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 7), generator=generator)
    labels[:, 4:] = -100
    labels = labels.float() if config.kind == "regression" else labels
    targets = noisy_targets(labels, config, seed=0, step=0)
    if config.kind != "soft_mse":  # soft targets of ignored rows are drawn but masked in the loss (below)
        assert torch.equal(targets[labels == -100], labels[labels == -100])
        assert not torch.equal(targets[labels != -100], labels[labels != -100])
    outputs = torch.randn(6, 7, 1 if config.kind == "regression" else 3, generator=generator)
    if config.kind == "regression":
        outputs = outputs.squeeze(-1)
    full = label_noise_loss_value({"logits": outputs}, labels, config, seed=0, step=0)
    garbage = outputs.clone()
    garbage[:, 4:] = 1e6
    assert float(full) == pytest.approx(float(label_noise_loss_value(garbage, labels, config, seed=0, step=0)))
    clean = label_noise_loss_value(outputs, labels, config, noisy=False)
    assert float(clean) == pytest.approx(float(label_noise_loss_value(garbage, labels, config, noisy=False)))


def test_loss_values_and_normalisation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    flip = LabelNoiseConfig(kind="flip", p=0.3, num_classes=3)
    clean = label_noise_loss_value(logits, labels, flip, noisy=False)
    torch.testing.assert_close(clean, torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(label_noise_loss_value(logits, labels, flip, noisy=False, num_items_in_batch=8),
                               clean * 2 / 8)
    soft = LabelNoiseConfig(kind="soft_mse", sigma=0.1, num_classes=3)
    expected = 0.5 * ((logits - torch.nn.functional.one_hot(labels, 3)) ** 2).sum() / 2
    torch.testing.assert_close(label_noise_loss_value(logits, labels, soft, noisy=False), expected)
    predictions, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(label_noise_loss_value(predictions, y, regression(), noisy=False),
                               torch.tensor(0.5 * (1 + 4) / 2))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="allowed"):
        LabelNoiseConfig(kind="dropout")
    with pytest.raises(ValueError, match="needs sigma"):
        LabelNoiseConfig(kind="regression")
    with pytest.raises(ValueError, match="needs 0 <= p <= 1"):
        LabelNoiseConfig(kind="flip", p=1.5, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        LabelNoiseConfig(kind="flip", p=0.1)
    with pytest.raises(ValueError, match="takes p, not sigma"):
        LabelNoiseConfig(kind="flip", p=0.1, sigma=1.0, num_classes=3)
    with pytest.raises(ValueError, match="unknown settings"):
        LabelNoiseConfig.from_value({"kind": "flip", "prob": 0.1})
    with pytest.raises(ValueError, match="outside range"):
        noisy_targets(torch.tensor([0, 5]), LabelNoiseConfig(kind="flip", p=0.1, num_classes=3), seed=0, step=0)
    with pytest.raises(ValueError, match="do not match"):
        label_noise_loss_value(torch.zeros(2, 4), torch.tensor([0, 1]),
                               LabelNoiseConfig(kind="flip", p=0.1, num_classes=3))
