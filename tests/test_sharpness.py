"""The sharpness probe: Hessian-vector products, Hutchinson's trace and the top eigenvalue against exact Hessians;
the callback leaves training bit-identical."""

import copy

import pytest
import torch

from hf_regtools.diagnostics import (SHARPNESS_KEYS, HessianOperator, SharpnessCallback, hessian_top_eigenvalue,
                                     hessian_trace, probe_mode)


class Quadratic(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.x = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))


def quadratic(A):
    return lambda model, batch: 0.5 * model.x @ A @ model.x


def symmetric(d, seed=0):
    M = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (M + M.T) / 2


def hutchinson_std(H, n):
    """Standard deviation of the Rademacher estimate with `n` probes: sqrt(2 (||H||_F^2 - sum H_ii^2) / n)."""
    return float((2 * ((H ** 2).sum() - (H.diagonal() ** 2).sum()) / n).sqrt())


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_quadratic_products_and_trace(method):
    torch.manual_seed(0)
    A = symmetric(12)
    model = Quadratic(12)
    operator = HessianOperator(model, quadratic(A), {}, method=method)
    v = {"x": torch.randn(12, dtype=torch.float64)}
    torch.testing.assert_close((operator @ v)["x"], A @ v["x"])
    diagonal = torch.diag(torch.arange(1.0, 13.0, dtype=torch.float64))
    assert hessian_trace(model, quadratic(diagonal), {}, 1, method=method) == pytest.approx(78.0)  # exact, 1 probe
    estimate = hessian_trace(model, quadratic(A), {}, 400, method=method)
    assert abs(estimate - float(A.trace())) < 4 * hutchinson_std(A, 400)


def tiny_network(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def network_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(16, 4, generator=generator, dtype=torch.float64),
            "y": torch.randint(0, 3, (16,), generator=generator)}


def network_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def exact_hessian(model, loss_fn, batches):
    """The full Hessian of the mean loss over `batches`, w.r.t. the flattened parameters (`torch.func.hessian`)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return sum(loss_fn(_Parametrized(model, params), batch) for batch in batches) / len(batches)

    return torch.func.hessian(loss)(flat)


class _Parametrized:
    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args):
        return torch.func.functional_call(self.model, self.params, args)


@pytest.mark.parametrize("method", ["forward", "reverse"])
def test_network_products_trace_and_top_eigenvalue_against_the_full_hessian(method):
    model, batches = tiny_network(), [network_batch(1), network_batch(2)]
    H = exact_hessian(model, network_loss, batches)
    operator = HessianOperator(model, network_loss, batches, method=method)
    v = operator.random_vector(torch.Generator().manual_seed(0), kind="gaussian")
    product = torch.cat([t.reshape(-1) for t in (operator @ v).values()])
    torch.testing.assert_close(product, H @ torch.cat([t.reshape(-1) for t in v.values()]))
    assert operator.calls == 2
    estimate = hessian_trace(model, network_loss, batches, 300, method=method)
    assert abs(estimate - float(H.trace())) < 4 * hutchinson_std(H, 300)
    eigenvalues = torch.linalg.eigvalsh(H)
    top = eigenvalues[eigenvalues.abs().argmax()]
    assert hessian_top_eigenvalue(model, network_loss, batches, 500, tol=1e-10, method=method) == pytest.approx(
        float(top), rel=1e-4)


def test_batch_norm_uses_batch_statistics_and_the_probe_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(6, 3)).double()
    model.train()
    batch = network_batch()
    reference = copy.deepcopy(model)
    reference[3].p = 0.0  # the probed loss has no dropout; BatchNorm on the batch's statistics, no updates
    reference[1].track_running_stats = False
    H = exact_hessian(reference, network_loss, [batch])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    estimate = hessian_trace(model, network_loss, batch, 200)
    assert abs(estimate - float(H.trace())) < 4 * hutchinson_std(H, 200)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats, num_batches_tracked
    assert model.training and all(m.training for m in model.modules()) and model[1].track_running_stats
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    model.eval()
    with probe_mode(model, "running"):
        assert not model[1].training
    assert not model.training


def test_bad_arguments():
    model = tiny_network()
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, network_loss, network_batch(), method="exact")
    with pytest.raises(ValueError, match="batch_norm"):
        hessian_trace(model, network_loss, network_batch(), batch_norm="eval")
    with pytest.raises(ValueError, match="n_probes"):
        hessian_trace(model, network_loss, network_batch(), 0)
    with pytest.raises(ValueError, match="at least one batch"):
        hessian_trace(model, network_loss, [])
    with pytest.raises(ValueError, match="every_n_steps"):
        SharpnessCallback(every_n_steps=0)


@pytest.mark.parametrize("model, kwargs", [("vgg_classifier", {}), ("transformers_vit", {"hidden_dropout_prob": 0.2})],
                         ids=["batchnorm", "dropout"])
def test_callback_logs_next_to_gradient_diagnostics_and_leaves_training_unchanged(model, kwargs, tmp_path):
    from hf_regtools.diagnostics import GradientDiagnosticsCallback, plot_diagnostics
    from hf_regtools.diagnostics.plot import DEFAULT_KEYS
    from hf_regtools.testing.harness import build_trainer

    case = {"model": model, "model_kwargs": kwargs, "callbacks": [], "deterministic": False}
    plain = build_trainer(case, tmp_path / "plain", max_steps=4)
    plain.train()
    probed = build_trainer(case, tmp_path / "probed", max_steps=4, callbacks=[
        GradientDiagnosticsCallback(every_n_steps=2, n_batches=2),
        SharpnessCallback(every_n_steps=2, n_probes=2, power_iterations=3)])
    probed.train()
    before, after = plain.model.state_dict(), probed.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    logged = [entry for entry in probed.state.log_history if SHARPNESS_KEYS[0] in entry]
    assert sorted({entry["step"] for entry in logged}) == [2, 3, 4]  # measured at 2 and 4, logged every step
    assert all(key in logged[-1] for key in (*SHARPNESS_KEYS, *DEFAULT_KEYS))
    png = plot_diagnostics({"probed": probed.state.log_history}, tmp_path / "sharpness.png",
                           keys=(*DEFAULT_KEYS, *SHARPNESS_KEYS))
    assert png.read_bytes()[:4] == b"\x89PNG"
