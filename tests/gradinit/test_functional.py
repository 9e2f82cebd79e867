"""GradInit / NIO semantics against direct computations (spec §6.2-7), invariants and input errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_regtools.gradinit import GradInitConfig, GradInitReport, gradinit_, nio_
from hf_regtools.gradinit.functional import gradient_cosine, nio_chunk_bounds, nio_objective


def mlp(seed=0, hidden=6, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, hidden, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 3, bias=bias)).double()


def pairs(count=6, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=generator)) for _ in range(count)]


def loss_at(model, params, batch):
    inputs, labels = batch
    return F.cross_entropy(functional_call(model, params, (inputs,)), labels)


def concat(a, b):
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def test_scale_gradient_equals_the_finite_difference_in_the_scale():
    model, (batch,) = mlp(), pairs(1)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = loss_at(model, initial | {}, batch)
    grads = dict(zip(initial, torch.autograd.grad(loss_at(model, {n: p for n, p in model.named_parameters()}, batch),
                                                  list(model.parameters()))))
    for name, w0 in initial.items():
        def at(scale):
            return loss_at(model, {**initial, name: scale * w0}, batch).item()
        finite_difference = (at(1 + 1e-6) - at(1 - 1e-6)) / 2e-6
        assert (grads[name] * w0).sum().item() == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)
    assert loss.item() > 0


def objective_scale_grads(model, batches, *, second_order, eta=0.1, normalize=True):
    """The GradInit objective of the first iteration and its gradient w.r.t. the scales, computed directly."""
    names = [name for name, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    scales = torch.ones(len(w0), dtype=torch.float64, requires_grad=True)
    theta = [s * w for s, w in zip(scales, w0)]
    b0, b1, b2 = batches[:3]
    loss = loss_at(model, dict(zip(names, theta)), concat(b0, b1))
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    gnorm = torch.sqrt(sum(g.square().sum() for g in grads))
    steps = [eta * (g / gnorm if normalize else g) for g in grads]
    simulated = [t - (s if second_order else s.detach()) for t, s in zip(theta, steps)]
    obj = loss_at(model, dict(zip(names, simulated)), concat(b0, b2)) / eta
    return obj, torch.autograd.grad(obj, scales)[0]


def test_objective_step_uses_the_stop_gradient_and_second_order_differs():
    batches = pairs()
    obj, expected = objective_scale_grads(mlp(), batches, second_order=False)
    _, second = objective_scale_grads(mlp(), batches, second_order=True)
    assert not torch.allclose(expected, second, rtol=1e-4, atol=0)
    for second_order, direct in ((False, expected), (True, second)):
        model = mlp()
        w0 = [p.detach().clone() for p in model.parameters()]
        report = gradinit_(model, batches, iterations=1, gamma=math.inf, grad_clip=0.0, lr=1e-3,
                           second_order=second_order)
        assert report.history[0]["obj"] == pytest.approx(obj.item(), rel=1e-12)
        # first Adam step of each scale: m = 1 - lr * sign(grad) (|grad| >> eps)
        for (name, scale), grad, w in zip(report.scales.items(), direct, w0):
            assert scale == pytest.approx(1 - 1e-3 * math.copysign(1, grad.item()), rel=1e-9), name


def test_constraint_branch_exactly_when_gnorm_exceeds_gamma():
    batches = pairs()
    report = gradinit_(mlp(), batches, iterations=8, gamma=math.inf)
    assert report.constraint_steps == 0 and report.objective_steps == 8
    gnorms = [entry["gnorm"] for entry in report.history]
    gamma = sorted(gnorms)[len(gnorms) // 2]
    report = gradinit_(mlp(), batches, iterations=8, gamma=gamma)
    for entry in report.history:
        assert (entry["branch"] == "constraint") == (entry["gnorm"] > gamma)
        assert (entry["obj"] is None) == (entry["branch"] == "constraint")
    assert report.constraint_steps + report.objective_steps == 8


def test_tiny_gamma_gives_only_constraint_steps_and_the_gradient_norm_decreases():
    fixed = pairs(2)
    report = gradinit_(mlp(), fixed, iterations=15, gamma=1e-8, lr=2e-2)
    gnorms = [entry["gnorm"] for entry in report.history]
    assert report.constraint_steps == 15 and report.objective_steps == 0
    assert gnorms[-1] < 0.8 * gnorms[0]


def test_adam_variant_uses_the_sign_step_and_l1_norm():
    batches = pairs()
    model = mlp()
    names = [name for name, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    scales = torch.ones(len(w0), dtype=torch.float64, requires_grad=True)
    theta = [s * w for s, w in zip(scales, w0)]
    b0, b1, b2 = batches[:3]
    grads = torch.autograd.grad(loss_at(model, dict(zip(names, theta)), concat(b0, b1)), theta, create_graph=True)
    l1 = sum(g.abs().sum() for g in grads)
    obj = loss_at(model, {n: t - 1e-3 * g.sign() for n, t, g in zip(names, theta, grads)}, concat(b0, b2)) / 1e-3
    direct = torch.autograd.grad(obj, scales)[0]
    report = gradinit_(model, batches, iterations=1, algorithm="adam", inner_lr=1e-3, gamma=1e6, grad_clip=0.0)
    assert report.history[0]["gnorm"] == pytest.approx(l1.item(), rel=1e-12)
    assert report.history[0]["obj"] == pytest.approx(obj.item(), rel=1e-12)
    assert list(report.scales.values()) == pytest.approx([1 - 1e-3 * math.copysign(1, g) for g in direct.tolist()])
    assert gradinit_(mlp(), batches, iterations=1, algorithm="adam", gamma=1e-9).constraint_steps == 1


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def image_pairs(count=4, size=4):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 6, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def test_batchnorm_statistics_untouched_and_modes_restored():
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.drop.eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    seen = []
    model.bn.register_forward_pre_hook(lambda m, _: seen.append((m.training, m.track_running_stats,
                                                                  model.drop.training)))
    report = gradinit_(model, image_pairs(), iterations=4, gamma=0.5)
    assert report.constraint_steps and report.objective_steps
    assert set(seen) == {(True, False, False)}
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert model.training and model.bn.training and model.bn.track_running_stats and not model.drop.training


def test_zero_tensors_stay_zero_norms_follow_the_scales_and_directions_are_kept():
    torch.manual_seed(0)
    model = BNNet()
    torch.nn.init.zeros_(model.fc.bias)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    identities = [id(p) for p in model.parameters()]
    report = gradinit_(model, image_pairs(), iterations=5, lr=5e-2)
    assert identities == [id(p) for p in model.parameters()]
    for name, p in model.named_parameters():
        w0, scale = initial[name], report.scales[name]
        if w0.norm() == 0:
            assert torch.equal(p.detach(), w0) and scale == 1.0
            continue
        assert p.detach().norm().item() == pytest.approx(scale * w0.norm().item(), rel=1e-5)
        assert F.cosine_similarity(p.detach().flatten(), w0.flatten(), dim=0).item() == pytest.approx(1, abs=1e-5)
    assert report.scales["bn.bias"] == 1.0 and any(s != 1.0 for s in report.scales.values())


def test_min_scale_applies_to_weights_and_zero_to_biases():
    report = gradinit_(mlp(), pairs(2), iterations=30, gamma=1e-9, lr=0.5, min_scale=0.6)
    assert report.scales["0.weight"] >= 0.6 and report.scales["2.weight"] >= 0.6
    assert min(report.scales.values()) < 0.6  # biases may shrink below it (official: min_scale 0 for biases)


def test_reference_module_types_step_only_those_modules():
    class WithNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = torch.nn.Linear(5, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    torch.manual_seed(0)
    model = WithNorm().double()
    names = [name for name, _ in model.named_parameters()]
    reference = copy.deepcopy(model)
    batches = pairs()
    b0, b1, b2 = batches[:3]
    params = dict(reference.named_parameters())
    stepped = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    grads = torch.autograd.grad(loss_at(reference, params, concat(b0, b1)), [params[n] for n in stepped])
    gnorm = torch.sqrt(sum(g.square().sum() for g in grads))
    simulated = {**params, **{n: params[n] - 0.1 * (g / gnorm).detach() for n, g in zip(stepped, grads)}}
    obj = loss_at(reference, simulated, concat(b0, b2)) / 0.1
    report = gradinit_(model, batches, iterations=1, gamma=math.inf, module_types="reference")
    assert report.history[0]["gnorm"] == pytest.approx(gnorm.item(), rel=1e-12)
    assert report.history[0]["obj"] == pytest.approx(obj.item(), rel=1e-12)
    assert sorted(report.scales) == sorted(names)  # LayerNorm tensors are scaled, not stepped
    assert report.config["module_types"] == ["Conv2d", "Linear", "BatchNorm2d"]


def test_nio_chunk_bounds_match_the_official_formula():
    def official(bs, chunks, r):
        length = int(bs / chunks)  # gradcos_initializer.batch_settings; its slices stop at the batch end
        return [(0, min(int((1 + r) * length * 1), bs)) if i == 0 else
                (int((1 - r) * length * i), bs) if i == chunks - 1 else
                (int((1 - r) * length * i), min(int((1 + r) * length * (i + 1)), bs)) for i in range(chunks)]

    assert nio_chunk_bounds(64, 4, 0.2) == official(64, 4, 0.2) == [(0, 19), (12, 38), (25, 57), (38, 64)]
    for bs, chunks, r in ((10, 3, 0.0), (33, 4, 0.5), (7, 2, 0.2)):
        assert nio_chunk_bounds(bs, chunks, r) == official(bs, chunks, r)
    with pytest.raises(ValueError, match="at least 4 examples"):
        nio_chunk_bounds(3, 4, 0.2)


def test_gradient_cosine_of_identical_chunks_is_one_and_orthogonal_is_zero():
    row = torch.randn(1, 7, dtype=torch.float64)
    assert gradient_cosine(row.repeat(4, 1)).item() == pytest.approx(1.0, rel=1e-12)
    assert gradient_cosine(torch.eye(3, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)


def test_gc_gn_sqrt_objective_matches_a_direct_computation():
    model, batches = mlp(), [(x.repeat(8, 1), y.repeat(8)) for x, y in pairs(1, size=8)]
    params = dict(model.named_parameters())
    x, y = batches[0]
    losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    flat = []
    for start, end in nio_chunk_bounds(len(y), 4, 0.2):
        grads = torch.autograd.grad(losses[start:end].mean(), list(params.values()), retain_graph=True)
        flat.append(torch.cat([g.flatten() for g in grads]))
    cosines = [F.cosine_similarity(flat[i], flat[j], dim=0) for i in range(4) for j in range(4) if i != j]
    norms = torch.stack([g.norm() for g in flat])
    expected = -(sum(cosines) / 12) - norms.sum()
    report = nio_(model, batches, iterations=1)
    assert report.history[0]["branch"] == "objective"
    assert report.history[0]["obj"] == pytest.approx(expected.item(), rel=1e-10)
    assert report.history[0]["gnorm"] == pytest.approx(norms.mean().item(), rel=1e-12)
    assert nio_objective("gc_gn", gc=torch.tensor(0.5), gv=torch.tensor(2.0), norms=torch.tensor([1.0, 2.0]),
                         mu=0.5).item() == pytest.approx(-0.5 - 2.5)
    assert nio_objective("gv_gn_sqrt", gc=torch.tensor(0.5), gv=torch.tensor(2.0), norms=torch.tensor([1.0, 2.0]),
                         mu=1.0).item() == pytest.approx(-1.0)


def test_nio_defaults_and_constraint():
    report = nio_(mlp(), pairs(2, size=16), iterations=2)
    assert report.config["objective"] == "gc_gn_sqrt" and report.config["gamma"] == 10.0
    assert report.config["lr"] == 3e-3
    assert nio_(mlp(), pairs(2, size=16), iterations=2, gamma=1e-9).constraint_steps == 2
    with pytest.raises(ValueError, match="per-example losses"):
        nio_(mlp(), pairs(2), iterations=1, loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))


def test_dict_batches_one_shot_iterators_and_report_json(tmp_path):
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, pixel_values, labels=None):
            logits = self.fc(pixel_values)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    torch.manual_seed(0)
    batches = ({"pixel_values": x.float(), "labels": y} for x, y in pairs(3))
    report = gradinit_(DictModel(), batches, iterations=4)
    assert isinstance(report, GradInitReport) and len(report.history) == 4
    report.save_json(tmp_path / "r.json")
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["scales"] == report.scales and saved["config"]["iterations"] == 4


def test_half_models_run_in_fp32_and_return_to_half():
    model = mlp().half()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    identities = [id(p) for p in model.parameters()]
    gradinit_(model, [(x.float(), y) for x, y in pairs(3)], iterations=2)
    assert set(seen) == {torch.float32}
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert identities == [id(p) for p in model.parameters()]


def test_progress_bar(capsys):
    gradinit_(mlp(), pairs(3), iterations=2, progress=True)
    assert "GradInit" in capsys.readouterr().err


@pytest.mark.parametrize("settings, match", [
    ({"iterations": 0}, "iterations"), ({"lr": -1.0}, "lr"), ({"algorithm": "rmsprop"}, "algorithm"),
    ({"gamma": 0.0}, "gamma"), ({"min_scale": -0.1}, "min_scale"), ({"max_scale": 0.001}, "max_scale"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"objective": "nope"}, "objective"), ({"nio_chunks": 1}, "nio_chunks"),
    ({"nio_overlap": 1.0}, "nio_overlap"), ({"module_types": ()}, "module_types"), ({"betas": (0.9,)}, "betas"),
    ({"normalize_grad": 1}, "normalize_grad"),
])
def test_bad_config_values_name_the_field(settings, match):
    with pytest.raises(ValueError, match=f"GradInitConfig.{match}"):
        GradInitConfig(**settings)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="batches is empty"):
        gradinit_(mlp(), [], iterations=1)
    with pytest.raises(ValueError, match="batches is empty"):
        gradinit_(mlp(), iter([]), iterations=1)
    with pytest.raises(TypeError, match="iterable of batches"):
        gradinit_(mlp(), torch.randn(3, 5), iterations=1)
    with pytest.raises(TypeError, match="dict of model inputs or an"):
        gradinit_(mlp(), [torch.randn(3, 5)], iterations=1)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradinit_(frozen, pairs(2), iterations=1)
    with pytest.raises(ValueError, match="no trainable tensors in modules of types"):
        gradinit_(mlp(), pairs(2), iterations=1, module_types=("Conv3d",))
    with pytest.raises(TypeError, match="unknown GradInit settings"):
        gradinit_(mlp(), pairs(2), iterations=1, step_size=0.1)
    with pytest.raises(ValueError, match="scalar loss"):
        gradinit_(mlp(), pairs(2), iterations=1, loss_fn=lambda model, batch: model(batch[0]))
    with pytest.raises(TypeError, match="unwrapped module"):
        gradinit_(torch.nn.DataParallel(mlp()), pairs(2), iterations=1)
    with pytest.raises(ValueError, match="GradInitConfig.gamma"):
        gradinit_(mlp(), pairs(2), iterations=1, gamma=-1.0)


def test_existing_gradients_are_left_as_they_were():
    model = mlp().half()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[2].bias.grad = None
    gradinit_(model, [(x.float(), y) for x, y in pairs(3)], iterations=2)
    assert model[2].bias.grad is None
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in [*model.parameters()][:3])


def test_graph_of_the_gradient_only_where_the_branch_needs_it_gives_the_same_result(monkeypatch):
    """g keeps its graph when the previous iteration took the constraint branch, and is computed again with it when
    that guess was wrong: the same scales, history and weights as keeping the graph at every iteration."""
    from hf_regtools.gradinit import functional
    from hf_regtools.testing import tiny_models

    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
                "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(5)]
    gnorms = [entry["gnorm"] for entry in gradinit_(tiny_models.transformers_resnet(), batches, iterations=10,
                                                       gamma=math.inf, lr=0.05).history]
    gamma = sorted(gnorms)[len(gnorms) // 2]
    torch.manual_seed(0)
    default_model = tiny_models.transformers_resnet()
    always_model = copy.deepcopy(default_model)
    graphs = []
    grads = functional._grads
    monkeypatch.setattr(functional, "_grads", lambda *a, **k: graphs.append(k.get("create_graph")) or grads(*a, **k))
    default = gradinit_(default_model, batches, iterations=10, gamma=gamma, lr=0.05)
    branches = [entry["branch"] for entry in default.history]
    assert 0 < default.constraint_steps < 10
    assert graphs.count(True) < len(graphs) and graphs.count(False) > 0

    iteration = functional._gradinit_iteration

    def keep_graph_always(*args):
        args[-1]["constraint"] = True
        return iteration(*args)

    monkeypatch.setattr(functional, "_gradinit_iteration", keep_graph_always)
    always = gradinit_(always_model, batches, iterations=10, gamma=gamma, lr=0.05)
    assert [entry["branch"] for entry in always.history] == branches
    assert always.history == default.history and always.scales == default.scales
    for (name, a), (_, b) in zip(default_model.state_dict().items(), always_model.state_dict().items()):
        assert torch.equal(a, b), name
