"""WeissiTrainerMixin: the loss gets coefficient * R in fp32 (also under bf16 autocast), weight decay leaves the
regularized weights, the parts and the coefficient are logged, spectral state survives checkpoints."""

import warnings

import pytest
import torch

from hf_regtools.schedules import coefficient_schedule
from hf_regtools.testing.harness import build_trainer, dataset
from hf_regtools.weissi import WeissiRegularizer

MIXIN = "hf_regtools.weissi:WeissiTrainerMixin"
MLP = {"model": "mlp_classifier", "callbacks": [], "mixin": MIXIN, "deterministic": True}
SETTINGS = {"lambda1": 0.05, "lambda2": 0.01}


def trainer_for(tmp_path, case=MLP, weissi=SETTINGS, **args):
    return build_trainer(case, tmp_path, trainer_init_kwargs={"weissi": weissi}, **{"max_steps": 2, **args})


def batch_of(case, size=8):
    return dataset(case, size=size)[:size]


def step_ready(trainer):
    """The trainer, set up to run `training_step` outside `train()` (one micro-batch per optimizer step)."""
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    return trainer


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_training_step_adds_the_penalty_and_its_gradient_and_the_evaluation_loss_does_not(tmp_path):
    trainer = step_ready(trainer_for(tmp_path))
    model, batch = trainer.model, batch_of(MLP)
    model.train()
    assert trainer.adds_term_gradient()  # in place (WeissiRegularizer.add_gradient_), not through autograd
    loss = trainer.training_step(model, dict(batch))
    got = gradients(model)
    model.zero_grad()
    expected = model(**batch)["loss"] + WeissiRegularizer(model, **SETTINGS)()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for name, value in gradients(model).items():
        torch.testing.assert_close(got[name], value, atol=1e-7, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch)["loss"])


def test_the_spectral_penalty_goes_through_autograd_in_compute_loss(tmp_path):
    settings = {**SETTINGS, "norm": "spectral"}
    trainer = trainer_for(tmp_path, weissi=settings)
    assert not trainer.adds_term_gradient()
    model, batch = trainer.model, batch_of(MLP)
    model.train()
    state = {name: vector.clone() for name, vector in trainer.weissi_regularizer.state.items()}
    loss = trainer.compute_loss(model, dict(batch))
    reference = WeissiRegularizer(model, **settings)
    reference.state = state
    torch.testing.assert_close(loss, model(**batch)["loss"] + reference())


def test_the_penalty_is_fp32_under_bf16_autocast(tmp_path):
    trainer = step_ready(trainer_for(tmp_path, bf16=True))
    model, batch = trainer.model, batch_of(MLP)
    model.train()
    trainer.training_step(model, dict(batch))
    exact = WeissiRegularizer(model, **SETTINGS).terms()
    for name in ("penalty", "log_norm_sum", "l1_direction"):
        assert trainer.technique_metrics()[f"hf_regtools/weissi/{name}"] == exact[name].item()


def test_the_trainer_optimizer_does_not_decay_the_regularized_weights(tmp_path):
    case = {**MLP, "model": "timm_resnet_classifier"}
    trainer = trainer_for(tmp_path, case, weissi={**SETTINGS, "bn": "include"}, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    managed = {id(w) for w in trainer.weissi_regularizer.weights}
    assert len(managed) == 14  # every convolution and the classifier
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.0 or not managed & {id(p) for p in group["params"]}
    assert any(group["weight_decay"] == 0.1 for group in optimizer.param_groups)  # BatchNorm weights: the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()


def test_an_optimizer_that_still_decays_them_warns(tmp_path):
    probe = trainer_for(tmp_path / "probe")
    model = probe.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    trainer = build_trainer(MLP, tmp_path, max_steps=2, model=model,
                            trainer_init_kwargs={"weissi": SETTINGS, "optimizers": (optimizer, None)})
    with pytest.warns(UserWarning, match=r"3 of 3 weights WEISSI regularizes \(e.g. layers.0.weight\)"):
        trainer.train()


def test_metrics_and_the_scheduled_coefficient_are_logged(tmp_path):
    trainer = trainer_for(tmp_path, weissi={**SETTINGS, "schedule": "linear", "warmup": 0.5}, max_steps=4)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    coefficients = {entry["step"]: entry["hf_regtools/weissi/coefficient"] for entry in logs}
    assert coefficients == {step + 1: coefficient_schedule(step / 4, kind="linear", warmup=0.5) for step in range(4)}
    assert coefficients == {1: 0.0, 2: 0.5, 3: 1.0, 4: 0.5}
    for entry in logs:
        parts = 0.05 * entry["hf_regtools/weissi/log_norm_sum"] + 0.01 * entry["hf_regtools/weissi/l1_direction"]
        assert entry["hf_regtools/weissi/penalty"] == pytest.approx(parts, rel=1e-5)
    (use,) = trainer.technique_uses()
    assert use.name == "weissi" and use.settings["lambda1"] == 0.05 and use.settings["schedule"] == "linear"


def test_spectral_power_iteration_vectors_are_checkpointed_and_restored(tmp_path):
    case = {**MLP, "model": "transformers_resnet"}
    weissi = {**SETTINGS, "bn": "include", "norm": "spectral"}
    full = trainer_for(tmp_path / "full", case, weissi=weissi, max_steps=3, save_steps=1)
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "weissi_state.pt")
    assert set(saved) == set(full.weissi_regularizer.names)
    resumed = trainer_for(tmp_path / "resumed", case, weissi=weissi, max_steps=3)
    loaded = {}
    original = resumed.weissi_regularizer.terms

    def record_first_call():
        if not loaded:
            loaded.update({name: vector.clone() for name, vector in resumed.weissi_regularizer.state.items()})
        return original()

    resumed.weissi_regularizer.terms = record_first_call
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 3 and loaded.keys() == saved.keys()
    for name, vector in saved.items():
        assert torch.equal(loaded[name], vector)
        assert torch.equal(resumed.weissi_regularizer.state[name], full.weissi_regularizer.state[name])


def test_the_mixin_needs_its_settings(tmp_path):
    with pytest.raises(ValueError, match="WeissiTrainerMixin needs weissi="):
        build_trainer(MLP, tmp_path, max_steps=1, trainer_init_kwargs={})
    with pytest.raises(TypeError, match="weissi= takes a WeissiConfig or a dict"):
        trainer_for(tmp_path, weissi=0.1)


def test_fp16_loss_scaling_trains_with_the_penalty(tmp_path):
    from hf_regtools.testing.harness import emulate_fp16_loss_scaling

    trainer = trainer_for(tmp_path, fp16=True, max_steps=3)
    emulate_fp16_loss_scaling(trainer)
    before = [w.detach().clone() for w in trainer.weissi_regularizer.weights]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["hf_regtools/weissi/penalty"])) for entry in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.weissi_regularizer.weights))


def test_under_fp16_loss_scaling_the_update_is_the_fp32_one(tmp_path):
    # the in-place gradient must carry the loss scale the Trainer's gradients carry until they are unscaled; a large
    # lambda1 makes the penalty the bulk of the update (fp16 autocast moves a few elements of the loss's share)
    from hf_regtools.testing.harness import emulate_fp16_loss_scaling

    runs = {}
    for precision in ("fp32", "fp16"):
        trainer = trainer_for(tmp_path / precision, max_steps=1, max_grad_norm=0.0, learning_rate=0.1,
                              weissi={"lambda1": 100.0, "lambda2": 1.0}, fp16=precision == "fp16")
        start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        if precision == "fp16":
            emulate_fp16_loss_scaling(trainer, init_scale=2.0 ** 10)
        trainer.train()
        runs[precision] = {name: p.detach() - start[name] for name, p in trainer.model.named_parameters()}
    for name, update in runs["fp32"].items():
        difference = (runs["fp16"][name] - update).abs().mean()
        assert difference < 0.02 * update.abs().mean(), name
