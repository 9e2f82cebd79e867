import numpy as np
import pytest
import torch

from hf_regtools.diagnostics import (gradient_direction_error, gradient_direction_variance, gradient_variance_metrics)


def test_direction_variance_known_values():
    g = torch.tensor([1.0, 2.0, 3.0])
    assert gradient_direction_variance(torch.stack([g, g, g])) == pytest.approx(0.0, abs=1e-12)
    assert gradient_direction_variance(torch.stack([g, -g])) == pytest.approx(1.0)
    assert gradient_direction_variance(torch.eye(3)) == pytest.approx(0.5)
    assert gradient_direction_error(torch.stack([g, 2 * g]), g) == pytest.approx(0.0, abs=1e-12)
    assert gradient_direction_error(torch.stack([g, -g]), g) == pytest.approx(0.5)


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(7, 20))
    cosine, trace, spectral = gradient_variance_metrics(torch.from_numpy(G))
    covariance = np.cov(G.T, bias=True)
    assert trace == pytest.approx(np.trace(covariance))
    assert spectral == pytest.approx(np.linalg.eigvalsh(covariance).max())
    unit = G / np.linalg.norm(G, axis=1, keepdims=True)
    pairs = [0.5 * (1 - unit[i] @ unit[j]) for i in range(7) for j in range(i + 1, 7)]
    assert cosine == pytest.approx(np.mean(pairs))
    assert gradient_direction_error(torch.from_numpy(G), torch.from_numpy(G.mean(0))) == pytest.approx(
        np.mean(0.5 * (1 - unit @ (G.mean(0) / np.linalg.norm(G.mean(0))))))


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        gradient_direction_variance(torch.ones(1, 3))


def test_callback_logs_and_leaves_training_unchanged(tmp_path):
    from hf_regtools.diagnostics import GradientDiagnosticsCallback, plot_diagnostics
    from hf_regtools.testing.harness import build_trainer

    case = {"model": "transformers_vit", "model_kwargs": {"hidden_dropout_prob": 0.2}, "callbacks": [],
            "deterministic": False}
    plain = build_trainer(case, tmp_path / "plain", max_steps=4)
    plain.train()
    diagnosed = build_trainer(case, tmp_path / "diag", max_steps=4,
                              callbacks=[GradientDiagnosticsCallback(every_n_steps=2, n_batches=3)])
    diagnosed.train()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), diagnosed.model.named_parameters()):
        assert torch.equal(a, b), name
    logged = [entry for entry in diagnosed.state.log_history if "hf_regtools/diagnostics/gdv" in entry]
    assert logged and all(0 <= entry["hf_regtools/diagnostics/gdv"] <= 1 for entry in logged)
    assert logged[-1]["hf_regtools/diagnostics/dist_from_init"] > 0
    png = plot_diagnostics({"vit": diagnosed.state.log_history}, tmp_path / "diag.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
