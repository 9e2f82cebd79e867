import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_regtools.alpha_svrg import AlphaSVRG, AlphaSVRGConfig, svrg_alpha_schedule
from hf_regtools.diagnostics import gradient_variance_metrics
from hf_regtools.testing.harness import build_trainer, emulate_fp16_loss_scaling

MIXIN = "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin"


def official_svrg_scheduler(start, epochs, niter_per_ep, freq, schedule="linear"):
    """The official `svrg_scheduler` as the spec describes it: one value per interval, linear across intervals."""
    if schedule == "constant":
        return np.full(epochs * niter_per_ep, start)
    intervals = math.ceil(niter_per_ep / freq)
    end = np.linspace(start, 0, epochs * intervals)
    return np.array([end[e * intervals + i // freq] for e in range(epochs) for i in range(niter_per_ep)])


@pytest.mark.parametrize("alpha0, epochs, n, every", [(0.75, 5, 4, 4), (0.75, 2, 4, 2), (1.0, 3, 5, 2), (0.5, 4, 3, 1)])
@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_alpha_schedule_parity(alpha0, epochs, n, every, kind):
    ours = [svrg_alpha_schedule(t, alpha0=alpha0, epochs=epochs, steps_per_epoch=n, snapshot_every=every, kind=kind)
            for t in range(epochs * n)]
    assert np.array_equal(ours, official_svrg_scheduler(alpha0, epochs, n, every, kind))


def test_alpha_schedule_spec_examples():
    per_epoch = [svrg_alpha_schedule(4 * e, alpha0=0.75, epochs=5, steps_per_epoch=4, snapshot_every=4) for e in range(5)]
    assert per_epoch == [0.75, 0.5625, 0.375, 0.1875, 0.0]
    per_step = [svrg_alpha_schedule(t, alpha0=0.75, epochs=2, steps_per_epoch=4, snapshot_every=2) for t in range(8)]
    assert per_step == [0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="longer than an epoch"):
        svrg_alpha_schedule(0, alpha0=0.75, epochs=2, steps_per_epoch=4, snapshot_every=8)


VIT = {"model": "transformers_vit", "callbacks": [], "deterministic": True,
       "model_kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def trained_parameters(tmp_path, name, *, mixin=None, svrg=None, **kwargs):
    case = dict(VIT, **({"mixin": mixin} if mixin else {}))
    trainer = build_trainer(case, tmp_path / name, trainer_init_kwargs={"alpha_svrg": svrg} if svrg else {},
                            max_grad_norm=0.0, **kwargs)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer


def test_alpha_zero_is_the_base_optimizer_bit_for_bit(tmp_path):
    plain, _ = trained_parameters(tmp_path, "plain", max_steps=4)
    svrg, trainer = trained_parameters(tmp_path, "svrg", mixin=MIXIN, svrg={"alpha0": 0.0, "kind": "constant"},
                                       max_steps=4)
    assert all(torch.equal(plain[k], svrg[k]) for k in plain)
    assert isinstance(trainer.optimizer.optimizer, AlphaSVRG)


def test_one_batch_per_epoch_is_the_baseline(tmp_path):
    settings = dict(max_steps=3, dataset_size=8, batch_size=8, optim="sgd", learning_rate=0.05)
    plain, _ = trained_parameters(tmp_path, "plain", **settings)
    svrg, _ = trained_parameters(tmp_path, "svrg", mixin=MIXIN, svrg={"alpha0": 1.0, "kind": "constant"}, **settings)
    for key in plain:
        torch.testing.assert_close(plain[key], svrg[key], atol=1e-6, rtol=0)


class CorrectedGradientProbe(TrainerCallback):
    def __init__(self):
        self.checked = 0

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != 0:
            return
        svrg = optimizer.optimizer
        for p, mu in zip(svrg.parameters(), svrg.full_gradient):
            torch.testing.assert_close(p.grad.float(), mu, atol=1e-6, rtol=1e-5)
            self.checked += 1


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-loss-scaling"])
@pytest.mark.parametrize("mode", ["snapshot", "cache"])
def test_first_step_after_refresh_with_alpha_one_uses_exactly_mu_with_paired_dropout_masks(tmp_path, mode, fp16):
    probe = CorrectedGradientProbe()
    case = {"model": "transformers_vit", "callbacks": [], "deterministic": False, "mixin": MIXIN,
            "model_kwargs": {"hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5}}
    trainer = build_trainer(case, tmp_path, max_steps=1, callbacks=[probe], max_grad_norm=0.0,
                            gradient_accumulation_steps=2, batch_size=4, fp16=fp16,
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 1.0, "kind": "constant", "mode": mode}})
    if fp16:
        emulate_fp16_loss_scaling(trainer, init_scale=2.0 ** 10)
    trainer.train()
    assert probe.checked == len(list(trainer.model.parameters()))


def test_svrg_reduces_gradient_variance_on_least_squares():
    torch.manual_seed(0)
    X, w_true = torch.randn(256, 10), torch.randn(10)
    y = X @ w_true + 0.5 * torch.randn(256)
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 256, 8)]

    def gradient(w, xb, yb):
        return 2 * xb.T @ (xb @ w - yb) / len(yb)

    def train(alpha):
        w = torch.nn.Parameter(torch.zeros(10))
        optimizer = AlphaSVRG(torch.optim.SGD([w], lr=0.02))
        optimizer.alpha = alpha
        for _ in range(5):
            snapshot = w.detach().clone()
            optimizer.set_full_gradient([torch.stack([gradient(snapshot, xb, yb) for xb, yb in batches]).mean(0)])
            for xb, yb in batches:
                optimizer.reset_snapshot_gradient()
                optimizer.accumulate_snapshot_gradient([gradient(snapshot, xb, yb)])
                w.grad = gradient(w.detach(), xb, yb)
                optimizer.step()
        snapshot = w.detach().clone()
        full = torch.stack([gradient(snapshot, xb, yb) for xb, yb in batches]).mean(0)
        corrected = torch.stack([gradient(w.detach(), xb, yb) - alpha * (gradient(snapshot, xb, yb) - full)
                                 for xb, yb in batches])
        return gradient_variance_metrics(corrected)[1], float(((X @ w.detach() - y) ** 2).mean())

    sgd_variance, sgd_loss = train(0.0)
    svrg_variance, svrg_loss = train(1.0)
    assert svrg_variance < 0.01 * sgd_variance
    assert svrg_loss <= sgd_loss + 1e-4


def test_wrapper_rules_and_state_round_trip():
    p = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.AdamW([p], lr=0.1)
    optimizer = AlphaSVRG(base)
    assert optimizer.param_groups is base.param_groups and optimizer.state is base.state
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert base.param_groups[0]["lr"] == 0.05
    optimizer.set_full_gradient([torch.ones(3)])
    optimizer.accumulate_snapshot_gradient([torch.full((3,), 0.5)])
    optimizer.alpha, p.grad = 0.5, torch.zeros(3)
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"base", "svrg"} and state["svrg"]["alpha"] == 0.5
    fresh = AlphaSVRG(torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.full_gradient[0], torch.ones(3)) and fresh.alpha == 0.5
    assert fresh.param_groups is fresh.base.param_groups and fresh.state is fresh.base.state
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 0.1)
    fresh.load_state_dict(fresh.state_dict())  # as Accelerate does when it prepares an optimizer
    fresh.step()
    scheduler.step()
    assert fresh.base.param_groups[0]["lr"] == pytest.approx(0.01)  # initial_lr 0.1 (saved) x 0.1
    built = AlphaSVRG([torch.nn.Parameter(torch.ones(2))], base=torch.optim.SGD, lr=0.1)
    assert isinstance(built.base, torch.optim.SGD)


def test_clipping_applies_to_the_corrected_gradient():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = AlphaSVRG(torch.optim.SGD([p], lr=1.0), clip_norm=1.0)
    optimizer.set_full_gradient([torch.tensor([3.0, 4.0])])
    optimizer.alpha, p.grad = 1.0, torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([0.6, 0.8]))


def test_bad_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        AlphaSVRGConfig(kind="cosine")
    with pytest.raises(ValueError, match="snapshot_every"):
        AlphaSVRGConfig(snapshot_every=0)
    with pytest.raises(ValueError, match="unknown alpha-SVRG mode"):
        AlphaSVRGConfig(mode="cached")
    with pytest.raises(ValueError, match="needs snapshot_every='epoch'"):
        AlphaSVRGConfig(mode="cache", snapshot_every=2)
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = AlphaSVRG(torch.optim.SGD([p], lr=1.0))
    optimizer.alpha, p.grad = 0.5, torch.zeros(2)
    with pytest.raises(RuntimeError, match="no full gradient"):
        optimizer.step()


SGD = dict(optim="sgd", learning_rate=0.05)


def test_gradient_accumulation_is_equivalent(tmp_path):
    svrg = {"alpha0": 1.0, "kind": "constant", "snapshot_every": 2}
    whole, _ = trained_parameters(tmp_path, "whole", mixin=MIXIN, svrg=svrg, max_steps=4, batch_size=8, **SGD)
    accumulated, _ = trained_parameters(tmp_path, "accumulated", mixin=MIXIN, svrg=svrg, max_steps=4, batch_size=4,
                                        gradient_accumulation_steps=2, **SGD)
    for key in whole:
        torch.testing.assert_close(whole[key], accumulated[key], atol=1e-6, rtol=0)


def test_bf16_autocast_keeps_fp32_buffers(tmp_path):
    _, trainer = trained_parameters(tmp_path, "bf16", mixin=MIXIN, svrg={"alpha0": 0.75, "snapshot_every": 2},
                                    max_steps=3, bf16=True)
    optimizer = trainer.svrg_optimizer
    assert all(t.dtype == torch.float32 for t in optimizer.full_gradient + optimizer.snapshot_gradient)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_optimizer_cls_and_kwargs_route_is_not_wrapped_twice(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_regtools.alpha_svrg import AlphaSVRGTrainerMixin
    from hf_regtools.testing.harness import build_model, dataset

    class SVRGTrainer(AlphaSVRGTrainerMixin, Trainer):
        pass

    routed = SVRGTrainer(model=build_model(VIT), train_dataset=dataset(VIT),
                         args=TrainingArguments(str(tmp_path / "routed"), max_steps=2, use_cpu=True, report_to="none",
                                                per_device_train_batch_size=8, max_grad_norm=0.0),
                         optimizer_cls_and_kwargs=(AlphaSVRG, {"base": torch.optim.SGD, "lr": 0.05}))
    routed.train()
    assert isinstance(routed.svrg_optimizer.base, torch.optim.SGD)
    assert not isinstance(routed.svrg_optimizer.base, AlphaSVRG)


def test_extra_memory_is_three_model_sized_tensors(tmp_path):
    _, trainer = trained_parameters(tmp_path, "memory", mixin=MIXIN, svrg={"alpha0": 0.75, "snapshot_every": 2},
                                    max_steps=2)
    optimizer = trainer.svrg_optimizer
    model_bytes = sum(p.numel() * 4 for p in trainer.model.parameters())
    held = [*optimizer.full_gradient, *optimizer.snapshot_gradient, *trainer.snapshot_model.parameters(),
            *trainer.snapshot_model.buffers()]
    assert sum(t.numel() * t.element_size() for t in held) == 3 * model_bytes


def test_snapshot_refreshes_at_every_interval_start_in_each_run(tmp_path):
    case = dict(VIT, mixin=MIXIN)
    trainer = build_trainer(case, tmp_path, max_steps=4, max_grad_norm=0.0, save_steps=1,
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.75, "kind": "constant", "snapshot_every": 2}})
    refreshes = []
    original = trainer.refresh_snapshot
    trainer.refresh_snapshot = lambda: (refreshes.append(trainer.state.global_step), original())[1]
    trainer.train()
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # the same object resumes at step 2
    assert refreshes == [0, 2, 2]


def test_training_again_does_not_wrap_twice(tmp_path):
    trainer = build_trainer(dict(VIT, mixin=MIXIN), tmp_path, max_steps=2, max_grad_norm=0.0)
    trainer.train()
    first = trainer.svrg_optimizer
    trainer.train()
    assert trainer.svrg_optimizer is first and not isinstance(first.base, AlphaSVRG)
    assert not isinstance(getattr(first.base, "optimizer", None), AlphaSVRG)
