"""Functional core of the large initial learning rate (spec §7): schedules, patch geometry and proportions, noise."""

import numpy as np
import pytest
import torch

from hf_regtools.large_lr import (OFFICIAL_SCHEDULES, ActivationNoise, PatchTransform,
                                  large_initial_lr_lambda, large_initial_lr_schedule, noise_level, patch_draws,
                                  patch_only_eval_set, patch_pattern)
from hf_regtools.schedules import MultiStepLRLambda, multistep_lr_factor


def test_decay_early_is_0_1_for_epochs_1_to_29_and_0_004_from_30():
    lam = large_initial_lr_lambda(steps_per_epoch=7)
    lrs = [0.1 * lam(s) for s in range(60 * 7)]
    for step, lr in enumerate(lrs):
        epoch = step // 7 + 1  # the official 1-based epoch
        assert lr == pytest.approx(0.1 if epoch < 30 else 0.004, rel=1e-12)
    assert [lam(s) for s in (29 * 7 - 1, 29 * 7)] == [1.0, pytest.approx(0.04)]


def test_official_fixed_and_default_schedules():
    fixed = large_initial_lr_lambda(5, schedule="fixed")
    assert {fixed(s) for s in range(0, 5 * 200, 7)} == {1.0}
    assert OFFICIAL_SCHEDULES["fixed"]["lr"] * fixed(999) == 0.004
    default = large_initial_lr_lambda(3, schedule="default")
    for epoch, factor in ((59, 1), (60, 0.2), (119, 0.2), (120, 0.04), (149, 0.04), (150, 0.008), (199, 0.008)):
        # 1-based epoch e starts at step (e - 1) * 3
        assert default((epoch - 1) * 3) == pytest.approx(factor)
        assert default((epoch - 1) * 3 + 2) == pytest.approx(factor)
    once = large_initial_lr_lambda(1, schedule="decay_once")
    assert [once(148), once(149)] == [1.0, pytest.approx(0.2)]


def test_milestones_in_steps_and_fractions():
    steps = large_initial_lr_lambda(milestones=(10, 20), factors=(0.5, 0.1), unit="steps")
    assert [steps(s) for s in (0, 9, 10, 19, 20, 100)] == pytest.approx([1, 1, 0.5, 0.5, 0.05, 0.05])
    fractions = large_initial_lr_lambda(milestones=(0.5, 0.75), factors=0.1, unit="fractions", total_steps=101)
    # milestone f takes effect from step floor(f * total_steps): 50 and 75
    assert [fractions(s) for s in (49, 50, 74, 75, 100)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    zero_based = large_initial_lr_lambda(4, milestones=(2,), factors=(0.5,), one_based=False)
    assert [zero_based(s) for s in (7, 8)] == [1.0, 0.5]


def test_schedule_factory_is_a_lambda_lr_resumable_from_the_step():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = large_initial_lr_schedule(optimizer, 2)
    for _ in range(58):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.004)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = large_initial_lr_schedule(fresh, 2)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_schedule_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown schedule"):
        large_initial_lr_lambda(1, schedule="cosine")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        large_initial_lr_lambda(None)
    with pytest.raises(ValueError, match="total_steps"):
        large_initial_lr_lambda(milestones=(0.5,), unit="fractions")
    with pytest.raises(ValueError, match="2 milestones"):
        MultiStepLRLambda(1, (1, 2), (0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="unit"):
        MultiStepLRLambda(1, (1,), unit="minutes")
    assert multistep_lr_factor(5, milestones=(1, 3), gamma=(0.5, 0.1)) == pytest.approx(0.05)


def test_pattern_is_the_official_construction():
    z, zeta = patch_pattern(seed=2)
    generator = torch.Generator().manual_seed(2)
    assert torch.equal(z, 1.25 * torch.randn(3, 7, 7, generator=generator))
    assert zeta.shape == (10, 1, 3, 7, 7) and zeta.abs().max() <= 0.1


def test_patch_geometry_is_the_centre_region_and_the_values_are_exact():
    transform = PatchTransform(seed=2)
    images = torch.randn(200, 3, 32, 32)
    labels = torch.arange(200) % 10
    patched, kind = transform.patch(images, labels, range(200))
    draws = patch_draws(range(200), 0, seed=2)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[12:19, 12:19] = False
    for i in range(200):
        region = patched[i, :, 12:19, 12:19]
        zeta = transform.zeta[labels[i], 0]
        if kind[i] == 0:
            assert torch.equal(patched[i], images[i])
        elif kind[i] == 1:
            assert torch.equal(patched[i][:, outside], images[i][:, outside])
            assert torch.allclose(region, transform.z + draws.sign[i] * zeta)
        else:
            assert not patched[i][:, outside].any()
            assert 0 <= draws.amplitude[i] <= 1.75
            assert torch.allclose(region, transform.z + draws.sign[i] * draws.amplitude[i] * zeta)
    assert set(kind.tolist()) == {0, 1, 2}


def test_proportions_signs_and_determinism_by_seed_epoch_and_index():
    n = 10_000
    draws = patch_draws(range(n), 0, seed=2)
    shares = np.bincount(draws.kind, minlength=3) / n
    assert shares == pytest.approx([0.2, 0.64, 0.16], abs=0.015)
    patched = draws.kind > 0
    assert abs((draws.sign[patched] > 0).mean() - 0.5) < 0.015
    later = patch_draws(range(n), 1, seed=2)
    assert np.array_equal(later.kind > 0, patched)  # the patched subset is fixed across epochs
    assert not np.array_equal(later.sign, draws.sign) and not np.array_equal(later.kind, draws.kind)
    again = patch_draws(list(range(n))[::-1], 0, seed=2)  # keyed by index, not by order or a global state
    np.random.seed(123)
    assert np.array_equal(again.kind[::-1], draws.kind) and np.array_equal(again.amplitude[::-1], draws.amplitude)
    other = patch_draws(range(n), 0, seed=3)
    assert not np.array_equal(other.kind, draws.kind)


def test_set_transform_on_a_dataset_uses_the_index_column_and_the_epoch():
    from datasets import Dataset

    rows = {"pixel_values": np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype("float32"),
            "labels": np.arange(40) % 10}
    dataset = Dataset.from_dict(rows).map(lambda _, i: {"idx": i}, with_indices=True)
    transform = PatchTransform(num_classes=10, patch=3, channels=1, return_kind=True)
    dataset.set_transform(transform)
    first = dataset[:]
    assert torch.equal(dataset[5:6]["pixel_values"][0], first["pixel_values"][5])
    direct, kind = transform.patch(torch.as_tensor(rows["pixel_values"]), torch.as_tensor(rows["labels"]), range(40))
    assert torch.equal(first["pixel_values"], direct) and torch.equal(first["patch_kind"], kind)
    transform.set_epoch(1)
    assert not torch.equal(dataset[:]["pixel_values"], first["pixel_values"])
    with pytest.raises(ValueError, match="idx"):
        PatchTransform()({"pixel_values": [], "labels": []})


def test_patch_only_eval_set_is_zero_outside_the_patch():
    transform = PatchTransform(seed=2)
    images, labels = patch_only_eval_set(transform, n=300, seed=0)
    assert images.shape == (300, 3, 32, 32) and labels.unique().numel() == 10
    outside = images.clone()
    outside[:, :, 12:19, 12:19] = 0
    assert not outside.any()


def test_the_patch_is_separable_only_nonlinearly():
    # spec §7.4: the 20 points z +- zeta_c
    z, zeta = patch_pattern(seed=2)
    x = torch.cat([z + zeta[:, 0], z - zeta[:, 0]]).flatten(1)
    x = (x - z.flatten()) / 0.1  # separability is invariant to translation and scale; this only speeds up the fits
    y = torch.arange(10).repeat(2)

    def fit(model, steps=1500):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (model(x).argmax(-1) == y).sum().item()

    torch.manual_seed(0)
    assert fit(torch.nn.Linear(x.shape[1], 10)) <= 11
    assert fit(torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))) == 20


def test_noise_level_anneals_at_the_milestone():
    assert noise_level(28 * 5 + 4, steps_per_epoch=5) == 0.4
    assert noise_level(29 * 5, steps_per_epoch=5) == pytest.approx(0.4e-5)
    assert noise_level(3, anneal=(3,), unit="steps", std=1.0, factor=0.5) == 0.5


def test_activation_noise_is_shared_training_only_and_keyed_by_step():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1),
                                torch.nn.BatchNorm2d(4, track_running_stats=False), torch.nn.ReLU())
    x = torch.randn(5, 1, 6, 6)
    model.eval()
    clean = model(x)
    noise = ActivationNoise(model, std=0.4)
    assert torch.equal(model(x), clean)  # no noise in eval
    model.train()
    noise.set_step(7)
    first = model[1](model[0](x)).detach()
    without = torch.nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, training=True)
    delta = first - without.detach()
    assert torch.allclose(delta, delta[:1, :1].expand_as(delta), atol=1e-6)  # one H x W map over batch and channels
    assert delta.std() == pytest.approx(0.4, rel=0.5)
    noise.set_step(7)
    assert torch.equal(model[1](model[0](x)).detach(), first)  # same (seed, step, call): same noise
    noise.set_step(8)
    assert not torch.equal(model[1](model[0](x)).detach(), first)
    noise.remove()
    assert torch.allclose(model[1](model[0](x)).detach(), without.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="noise sites"):
        ActivationNoise(torch.nn.Linear(2, 2))
