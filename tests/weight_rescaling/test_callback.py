"""`WeightRescalingCallback` and `WeightRescalingTrainerMixin` in a real `Trainer` (spec §7: 1, 6, 7)."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from hf_regtools.optim import PaperWeightDecayMixin
from hf_regtools.testing.harness import build_trainer, emulate_fp16_loss_scaling
from hf_regtools.trainer import RegtoolsTrainerMixin
from hf_regtools.weight_rescaling import (WeightRescalingCallback, WeightRescalingTrainerMixin,
                                          find_scale_invariant_pairs)

CASE = {"model": "timm_resnet_classifier", "callbacks": []}
MIXIN_CASE = {**CASE, "mixin": "hf_regtools.weight_rescaling:WeightRescalingTrainerMixin"}


class Snapshots(TrainerCallback):
    """Parameters (and the step-skipped flag) at every `on_optimizer_step`, where this callback runs."""

    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        self.steps.append({"step": state.global_step + 1,
                           "skipped": bool(getattr(optimizer, "step_was_skipped", False)),
                           "scale": scaler.get_scale() if scaler is not None else None,
                           "parameters": {n: p.detach().clone() for n, p in model.named_parameters()}})


def filter_norms(model, pairs):
    return {pair.name: pair.weight.detach().flatten(1).norm(dim=1) for pair in pairs}


def test_after_each_step_managed_filters_have_norm_r_and_nothing_else_changed(tmp_path):
    before, after = Snapshots(), Snapshots()
    callback = WeightRescalingCallback(r=0.5)
    trainer = build_trainer(CASE, tmp_path, max_steps=3, callbacks=[before, callback, after])
    trainer.train()
    managed = {f"{pair.name}.weight" for pair in callback.pairs} | {f"{pair.name}.bias" for pair in callback.pairs}
    assert len(callback.pairs) == 13
    for pre, post in zip(before.steps, after.steps):
        for name, value in post["parameters"].items():
            if name in managed:
                torch.testing.assert_close(value.flatten(1).norm(dim=1), torch.full((value.shape[0],), 0.5),
                                           atol=1e-6, rtol=0)
            else:
                assert torch.equal(value, pre["parameters"][name]), name
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert entry["hf_regtools/weight_rescaling/max_norm_before"] >= entry[
            "hf_regtools/weight_rescaling/mean_norm_before"] > 0.5  # steps grow filter norms on average
    assert trainer.technique_metrics() == {k: v for k, v in logged[-1].items() if k.startswith("hf_regtools/")}


def test_every_k_steps(tmp_path):
    after = Snapshots()
    callback = WeightRescalingCallback(every=2)
    trainer = build_trainer(CASE, tmp_path, max_steps=4, callbacks=[callback, after], learning_rate=0.05)
    trainer.train()
    name = callback.pairs[0].name + ".weight"
    at_unit = [torch.allclose(s["parameters"][name].flatten(1).norm(dim=1), torch.ones(1), atol=1e-6)
               for s in after.steps]
    assert at_unit == [False, True, False, True]


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_steps_the_fp16_scaler_skipped_are_not_rescaled(optim, tmp_path):
    """Accelerate's GPU fp16 path on CPU: the first step overflows (scale 2**40) and is skipped, the scale drops to
    2**10 and the next steps run. With a plain optimizer `step_was_skipped` is already set when `on_optimizer_step`
    fires; fused AdamW skips inside its own step and Accelerate reports `False`, so the callback also reads the
    scale."""
    before, after = Snapshots(), Snapshots()
    callback = WeightRescalingCallback()
    trainer = build_trainer(CASE, tmp_path, max_steps=3, callbacks=[before, callback, after], fp16=True,
                            max_grad_norm=0.0, optim=optim)
    emulate_fp16_loss_scaling(trainer)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert [s["skipped"] for s in after.steps] == [optim == "adamw_torch", False, False]
    assert [s["scale"] for s in after.steps] == [2.0**10] * 3
    for name, value in after.steps[0]["parameters"].items():
        assert torch.equal(value, initial[name]), name  # neither the optimizer nor the callback touched anything
    name = callback.pairs[0].name + ".weight"
    for step in after.steps[1:]:
        torch.testing.assert_close(step["parameters"][name].flatten(1).norm(dim=1),
                                   torch.ones(step["parameters"][name].shape[0]), atol=1e-6, rtol=0)


def test_skipped_flag_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    callback = WeightRescalingCallback()
    callback.on_train_begin(SimpleNamespace(fsdp=""), None, None, model=model, optimizer=None)
    weight = model[0].weight.detach().clone()
    callback.on_optimizer_step(None, SimpleNamespace(global_step=0), None, optimizer=SimpleNamespace(
        step_was_skipped=True))
    assert torch.equal(model[0].weight, weight) and callback.metrics() == {}
    callback.on_optimizer_step(None, SimpleNamespace(global_step=0), None, optimizer=SimpleNamespace(
        step_was_skipped=False))
    assert not torch.equal(model[0].weight, weight) and callback.metrics()


def test_weight_decay_on_managed_weights_warns_once_and_the_mixin_removes_it(tmp_path):
    trainer = build_trainer(CASE, tmp_path / "plain", max_steps=2, weight_decay=0.1,
                            callbacks=[WeightRescalingCallback()])
    with pytest.warns(UserWarning, match=r"13 of 13 managed weights \(e.g. backbone.conv1.weight\) .*weight_decay > 0"
                                         r".*WeightRescalingTrainerMixin"):
        trainer.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "managed weights" in str(w.message)]

    callback = WeightRescalingCallback()
    trainer = build_trainer(MIXIN_CASE, tmp_path / "mixin", max_steps=2, weight_decay=0.1, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "managed weights" in str(w.message)]
    managed = {id(pair.weight) for pair in callback.pairs}
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(decay[i] == 0.0 for i in managed)
    assert decay[id(trainer.model.backbone.fc.weight)] == 0.1


class PaperWRSMixin(WeightRescalingTrainerMixin, PaperWeightDecayMixin):
    pass


def test_the_mixin_filters_the_papers_grouping_and_needs_the_callback(tmp_path):
    trainer = build_trainer({**CASE, "mixin": f"{__name__}:PaperWRSMixin"}, tmp_path, max_steps=1,
                            callbacks=[WeightRescalingCallback()])
    names = trainer.get_decay_parameter_names(trainer.model)
    assert names == ["backbone.fc.weight"]  # BN weights, biases (papers' rule) and managed weights excluded
    mixin_only = build_trainer(MIXIN_CASE, tmp_path / "none", max_steps=1, callbacks=[])
    with pytest.raises(ValueError, match=r"add callbacks=\[WeightRescalingCallback"):
        mixin_only.train()


def test_explicit_pairs_state_round_trip_and_model_card_entry(tmp_path):
    callback = WeightRescalingCallback(r=2.0, every=3, pairs=[("backbone.conv1", "backbone.bn1")])
    state = json.loads(json.dumps(callback.state()))
    restored = WeightRescalingCallback(**state["args"])
    assert restored.state() == state and restored.pair_names == [("backbone.conv1", "backbone.bn1")]
    trainer = build_trainer(CASE, tmp_path, max_steps=1, callbacks=[restored])
    trainer.train()
    assert [pair.name for pair in restored.pairs] == ["backbone.conv1"]
    use = restored.technique_use()
    assert use.name == "weight_rescaling" and use.settings["callback"] == "WeightRescalingCallback"
    assert use.settings["r"] == 2.0 and use.settings["pairs"] == [["backbone.conv1", "backbone.bn1"]]
    assert issubclass(WeightRescalingTrainerMixin, RegtoolsTrainerMixin)


def test_bad_settings_and_unsupported_setups_raise():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        WeightRescalingCallback(every=0)
    with pytest.raises(ValueError, match="target norm r must be positive"):
        WeightRescalingCallback(r=0)
    with pytest.raises(ValueError, match="unknown method"):
        WeightRescalingCallback(method="jit")
    with pytest.raises(ValueError, match="does not support FSDP"):
        WeightRescalingCallback().on_train_begin(SimpleNamespace(fsdp="full_shard"), None, None,
                                                 model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="found no convolution or linear layer followed directly by a BatchNorm"):
        WeightRescalingCallback().on_train_begin(SimpleNamespace(fsdp=""), None, None, model=torch.nn.Linear(2, 2))


def test_pairs_are_the_trainers_model_names(tmp_path):
    trainer = build_trainer({"model": "transformers_resnet", "callbacks": []}, tmp_path, max_steps=1,
                            callbacks=[WeightRescalingCallback()])
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightRescalingCallback))
    assert [pair.name for pair in callback.pairs] == [pair.name for pair in find_scale_invariant_pairs(
        trainer.model, method="names")]
    assert callback.pairs[0].name == "resnet.embedder.embedder.convolution"
