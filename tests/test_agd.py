"""Automatic Gradient Descent (`hf_regtools.optim.AGD`, `agd_init_`): the official algorithm's invariants and formulas
(spec gradinit.md §2 "AGD", §6.8), Trainer use and resume, and a small real-data check on digits.

The official `jxbz/agd` `agd.py` (checked by hand, not needed here): `s_k = sqrt(d_k / d_{k-1})`, divided by
`sqrt(kh * kw)` for 4-D kernels; init `orthogonal_` per 2-D weight / per kernel position, times `s_k`; step
`G = (1/L) sum_k s_k sum_slices ||g_k||`, `eta = log((1 + sqrt(1 + 4G)) / 2)`,
`W_k -= gain * eta / L * nan_to_num(s_k / ||g_k||_slice) * g_k`.
"""

import io
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from hf_regtools.optim import AGD, AGDMetricsCallback, agd_init_
from hf_regtools.testing.harness import build_trainer

CASE = {"model": "mlp_classifier", "callbacks": [], "deterministic": True, "optimizer": ("hf_regtools.optim:AGD", {})}
PAPER_STEP = {"max_grad_norm": 0.0, "lr_scheduler_type": "constant"}


def scale(shape):
    fan_out, fan_in, *kernel = shape
    return math.sqrt(fan_out / fan_in) / math.sqrt(math.prod(kernel))


def slices(tensor):
    """The `d_k x d_{k-1}` matrices of a weight: itself, or one per kernel position."""
    return [tensor] if tensor.dim() == 2 else list(tensor.flatten(2).unbind(-1))


class Toy(torch.nn.Module):
    """Tall, square and wide linear weights and two convolution kernels (one with a non-square kernel), no biases."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, bias=False)      # slices 8x3: tall
        self.conv2 = torch.nn.Conv2d(8, 4, (3, 2), bias=False)  # slices 4x8: wide
        self.tall = torch.nn.Linear(4 * 3 * 4, 96, bias=False)
        self.square = torch.nn.Linear(96, 96, bias=False)
        self.wide = torch.nn.Linear(96, 5, bias=False)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)
        return self.wide(torch.relu(self.square(torch.relu(self.tall(x)))))


def toy_loss(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 7, 7, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_init_is_semi_orthogonal_times_s_per_slice_and_keeps_parameters():
    torch.manual_seed(0)
    model = Toy()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    assert agd_init_(model) is model
    for name, (parameter, old) in before.items():
        current = dict(model.named_parameters())[name]
        assert current is parameter and not torch.equal(current, old)
        s = scale(current.shape)
        for matrix in slices(current.detach()):
            tall = matrix.shape[0] >= matrix.shape[1]
            gram = matrix.T @ matrix if tall else matrix @ matrix.T
            torch.testing.assert_close(gram, s ** 2 * torch.eye(gram.shape[0]), atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(torch.linalg.svdvals(matrix), torch.full((min(matrix.shape),), s), atol=1e-5,
                                       rtol=0)


def test_init_follows_the_official_procedure_and_torch_rng():
    torch.manual_seed(0)
    ours, reference = Toy(), Toy()
    torch.manual_seed(3)
    agd_init_(ours)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 2:
                torch.nn.init.orthogonal_(p)
            else:
                for kx in range(p.shape[2]):
                    for ky in range(p.shape[3]):
                        torch.nn.init.orthogonal_(p[:, :, kx, ky])
            p *= scale(p.shape)
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_init_of_frozen_parameters_and_params():
    layer = torch.nn.Linear(3, 6, bias=False)
    frozen = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)
    old = frozen.weight.clone()
    agd_init_(torch.nn.Sequential(layer, frozen))
    assert torch.equal(frozen.weight, old)
    agd_init_([frozen.weight])
    torch.testing.assert_close(frozen.weight.T @ frozen.weight, torch.eye(3), atol=1e-5, rtol=0)


def test_step_update_norm_per_layer_and_slice_is_gain_eta_over_l_times_s():
    torch.manual_seed(0)
    model = agd_init_(Toy())
    optimizer = AGD(model.parameters(), gain=2.5)
    before = [p.detach().clone() for p in model.parameters()]
    toy_loss(model).backward()
    optimizer.step()
    depth = 5
    eta = optimizer.eta.item()
    for old, p in zip(before, model.parameters()):
        for update in slices(p.detach() - old):
            assert torch.linalg.norm(update).item() == pytest.approx(2.5 * eta / depth * scale(p.shape), rel=1e-4)


def test_gradient_summary_eta_and_update_exactly():
    tall = torch.nn.Parameter(torch.zeros(4, 2))        # s = sqrt(2)
    kernel = torch.nn.Parameter(torch.zeros(2, 4, 1, 2))  # s = sqrt(2 / 4) / sqrt(2) = 0.5
    tall.grad = torch.ones(4, 2)                          # ||g|| = sqrt(8)
    kernel.grad = torch.cat([torch.ones(2, 4, 1, 1), -2 * torch.ones(2, 4, 1, 1)], dim=-1)  # slices sqrt(8), 2 sqrt(8)
    optimizer = AGD([tall, kernel], lr=0.5, gain=3.0)
    optimizer.step()
    summary = (math.sqrt(2) * math.sqrt(8) + 0.5 * (math.sqrt(8) + 2 * math.sqrt(8))) / 2
    eta = math.log((1 + math.sqrt(1 + 4 * summary)) / 2)
    assert optimizer.gradient_summary.item() == pytest.approx(summary, rel=1e-6)
    assert optimizer.eta.item() == pytest.approx(eta, rel=1e-6)
    step = 3.0 * 0.5 * eta / 2
    torch.testing.assert_close(tall.detach(), -step * math.sqrt(2) * torch.ones(4, 2) / math.sqrt(8))
    expected = -step * 0.5 * kernel.grad / math.sqrt(8) * torch.tensor([1.0, 0.5])
    torch.testing.assert_close(kernel.detach(), expected)


def test_zero_and_missing_gradients_do_not_move_and_count_in_l():
    a, b, c = (torch.nn.Parameter(torch.ones(3, 3)) for _ in range(3))
    a.grad, b.grad = torch.ones(3, 3), torch.zeros(3, 3)
    optimizer = AGD([a, b, c])
    optimizer.step()
    assert optimizer.depth == 3
    assert optimizer.gradient_summary.item() == pytest.approx(3.0 / 3)
    assert torch.equal(b, torch.ones(3, 3)) and torch.equal(c, torch.ones(3, 3))
    assert torch.isfinite(a).all() and not torch.equal(a, torch.ones(3, 3))
    AGD([c]).step()   # no gradient at all: nothing happens
    assert torch.equal(c, torch.ones(3, 3))


def test_one_dimensional_parameters_raise_naming_them_before_anything_changes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    with pytest.raises(ValueError, match=r"0\.bias \(shape \(4,\)\), 1\.weight \(shape \(4,\)\), 1\.bias .*bias=False"):
        AGD(model)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(4,\)\)"):
        AGD(model[0].parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(4,\)\).*requires_grad_"):
        AGD([{"params": [model[0].weight]}, {"params": [model[0].bias]}])
    with pytest.raises(ValueError, match=r"fewer: name \(shape \(\)\)"):
        AGD([("name", torch.nn.Parameter(torch.tensor(1.0)))])
    old = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"agd_init_ .* 0\.bias"):
        agd_init_(model)
    assert torch.equal(model[0].weight, old)
    optimizer = AGD([model[2].weight])
    with pytest.raises(ValueError, match="1.weight|params"):
        optimizer.add_param_group({"params": [model[1].weight]})


def test_sharded_parameters_raise():
    class DTensor(torch.nn.Parameter):   # what FSDP2 / tensor parallelism hand the optimizer, by type name
        pass

    with pytest.raises(ValueError, match=r"params\[0\] are sharded DTensors"):
        AGD([DTensor(torch.randn(3, 3))])


def test_weight_decay_and_bad_multipliers_raise():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"no weight decay.*param group 0 has weight_decay=0.01.*weight_decay=0.0"):
        AGD([{"params": [weight], "weight_decay": 0.01}])
    AGD([{"params": [weight], "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}])  # the Trainer's groups
    generator_group = AGD([{"params": (p for p in [weight])}])
    generator_group.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.randn(2, 2))])})
    assert [len(group["params"]) for group in generator_group.param_groups] == [1, 1]
    for kwargs in ({"lr": -1.0}, {"gain": float("nan")}):
        with pytest.raises(ValueError, match="finite number >= 0"):
            AGD([weight], **kwargs)
    with pytest.raises(ValueError, match="param group 1"):
        AGD([{"params": [weight]}, {"params": [torch.nn.Parameter(torch.randn(2, 2))], "lr": -2}])


def test_group_lr_multiplies_gain_and_l_counts_every_group():
    torch.manual_seed(0)
    model = agd_init_(Toy())
    weights = list(model.parameters())
    optimizer = AGD([{"params": weights[:2]}, {"params": weights[2:], "lr": 0.25}], gain=2.0)
    before = [p.detach().clone() for p in weights]
    toy_loss(model).backward()
    optimizer.step()
    eta = optimizer.eta.item()
    for index, (old, p) in enumerate(zip(before, weights)):
        lr = 1.0 if index < 2 else 0.25
        for update in slices(p.detach() - old):
            assert torch.linalg.norm(update).item() == pytest.approx(2.0 * lr * eta / 5 * scale(p.shape), rel=1e-4)


def test_a_scheduler_scales_the_step():
    torch.manual_seed(0)
    model = agd_init_(Toy())
    optimizer = AGD(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        toy_loss(model, seed=step).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        for old, p in zip(before, model.parameters()):
            expected = 0.5 ** step * optimizer.eta.item() / 5 * scale(p.shape)
            assert torch.linalg.norm(slices(p.detach() - old)[0]).item() == pytest.approx(expected, rel=1e-4)


def train(model, optimizer, steps, first=0):
    for step in range(first, first + steps):
        toy_loss(model, seed=step).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = agd_init_(Toy())
    resumed_model = Toy()
    resumed_model.load_state_dict(model.state_dict())
    optimizer = AGD([{"params": list(model.parameters())[:3]}, {"params": list(model.parameters())[3:], "lr": 0.5}],
                    gain=2.0)
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, 3, first=3)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AGD([{"params": list(resumed_model.parameters())[:3]}, {"params": list(resumed_model.parameters())[3:]}])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert [(g["lr"], g["gain"]) for g in resumed.param_groups] == [(1.0, 2.0), (0.5, 2.0)]
    train(resumed_model, resumed, 3, first=3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_importing_optim_stays_light():
    code = "import sys, hf_regtools.optim as o; o.__all__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == \
        "False"


class StepRecorder(AGDMetricsCallback):
    """Weights, group lr and eta after every optimizer step."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        agd = optimizer.optimizer
        self.steps.append({"lr": agd.param_groups[0]["lr"], "eta": agd.eta.item(),
                           "weights": [p.detach().clone() for p in model.parameters()]})


def test_trainer_trains_with_agd_and_a_cosine_schedule_scales_the_step(tmp_path):
    trainer = build_trainer(CASE, tmp_path / "plain", max_steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert isinstance(trainer.optimizer.optimizer, AGD)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    runs = {}
    for schedule in ("constant", "cosine"):
        recorder = StepRecorder()
        trainer = build_trainer(CASE, tmp_path / schedule, max_steps=3, callbacks=[recorder],
                                **{**PAPER_STEP, "lr_scheduler_type": schedule})
        initial = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        runs[schedule] = recorder.steps
        shapes = [p.shape for p in trainer.model.parameters()]
        previous = initial
        for step in recorder.steps:
            for old, new, shape in zip(previous, step["weights"], shapes):
                assert torch.linalg.norm(new - old).item() == pytest.approx(
                    step["lr"] * step["eta"] / len(shapes) * scale(shape), rel=1e-4)
            previous = step["weights"]
        logged = [entry["hf_regtools/agd/eta"] for entry in trainer.state.log_history if "loss" in entry]
        assert logged == pytest.approx([step["eta"] for step in recorder.steps])
    assert [step["lr"] for step in runs["constant"]] == [1.0, 1.0, 1.0]
    assert [step["lr"] for step in runs["cosine"]] == pytest.approx([1.0, 0.75, 0.25])
    assert all(torch.equal(a, b) for a, b in zip(runs["constant"][0]["weights"], runs["cosine"][0]["weights"]))
    assert not torch.equal(runs["constant"][-1]["weights"][0], runs["cosine"][-1]["weights"][0])


def test_trainer_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    case = {**CASE, "callbacks": [("hf_regtools.optim:AGDMetricsCallback", {})], "trainer_kwargs": PAPER_STEP}
    full = build_trainer(case, tmp_path / "full", max_steps=4, save_steps=1, dataset_size=20)
    full.train()
    resumed = build_trainer(case, tmp_path / "resumed", max_steps=4, save_steps=1, dataset_size=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    load = lambda run: torch.load(tmp_path / run / "checkpoint-4" / "optimizer.pt")  # noqa: E731
    assert load("full") == load("resumed")
    assert full.technique_metrics() == resumed.technique_metrics() != {}
    state = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert "hf_regtools/agd/eta" in state["log_history"][-1]


def test_metrics_callback_checks_the_optimizer_and_warns_about_clipping(tmp_path):
    trainer = build_trainer(CASE, tmp_path / "clipped", max_steps=1, callbacks=[AGDMetricsCallback()])
    with pytest.warns(UserWarning, match="max_grad_norm=0.0"):
        trainer.train()
    sgd_case = {k: v for k, v in CASE.items() if k != "optimizer"}
    trainer = build_trainer(sgd_case, tmp_path / "sgd", max_steps=1, callbacks=[AGDMetricsCallback()])
    with pytest.raises(ValueError, match=r"optimizer_cls_and_kwargs=\(AGD, \{\}\)"):
        trainer.train()


class FCN(torch.nn.Module):
    """The official code's fully connected network: bias-free, ReLU times sqrt(2)."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x)) * math.sqrt(2)
        return self.layers[-1](x)


def test_agd_with_default_gain_learns_digits():
    from hf_regtools.testing.digits import digits_dataset, tensors

    train_x, train_y = tensors(digits_dataset(split="train"))
    test_x, test_y = tensors(digits_dataset(split="test"))
    train_x, test_x = train_x.flatten(1), test_x.flatten(1)
    accuracies = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = agd_init_(FCN([64, 128, 128, 10]))
        optimizer = AGD(model.parameters())
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            for batch in torch.randperm(len(train_y), generator=generator).split(64):
                torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            accuracies.append((model(test_x).argmax(-1) == test_y).float().mean().item())
    # measured 0.922 mean (3 seeds); chance is 0.1
    assert sum(accuracies) / len(accuracies) > 0.85, accuracies
