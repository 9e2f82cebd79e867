import warnings

import pytest
import torch
import transformers

from hf_regtools.dropout_schedules import (DropScheduleCallback, EarlyDropoutCallback, LateDropoutCallback,
                                           LateStochasticDepthCallback, block_rates)
from hf_regtools.schedules import drop_schedule
from hf_regtools.testing.harness import build_trainer

VIT = {"model": "transformers_vit", "model_kwargs": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
       "callbacks": [], "deterministic": False}


def test_rate_changes_only_at_update_boundaries_with_gradient_accumulation(tmp_path):
    callback = EarlyDropoutCallback(p=0.4, cutoff_steps=4)
    trainer = build_trainer(VIT, tmp_path, max_steps=6, batch_size=4, gradient_accumulation_steps=4,
                            callbacks=[callback])
    seen = []
    dropout = trainer.model.vit.embeddings.dropout
    hook = dropout.register_forward_pre_hook(lambda module, args: seen.append((trainer.state.global_step, module.p)))
    trainer.train()
    hook.remove()
    assert len(seen) == 4 + 4 + 4 + 3 + 4 + 4  # 60 examples = 15 micro-batches of 4: the 4th update has 3
    for step, rate in seen:
        assert rate == drop_schedule(step, p=0.4, cutoff_step=4, mode="early", schedule="linear")
    logged = [entry["hf_regtools/dropout_schedules/dropout_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [drop_schedule(s, p=0.4, cutoff_step=4, schedule="linear") for s in range(6)]


def test_cutoff_units(tmp_path):
    epochs = EarlyDropoutCallback(p=0.2, cutoff_epochs=0.5, schedule="constant")
    fraction = LateDropoutCallback(p=0.2, cutoff_fraction=0.25)
    trainer = build_trainer(VIT, tmp_path, max_steps=8, batch_size=8, callbacks=[epochs, fraction])
    trainer.train()
    assert epochs.steps_per_epoch == 8 and epochs.cutoff_step == 4  # 60 samples / batch 8: 7 full batches and 1 of 4
    assert fraction.cutoff_step == 2
    assert trainer.model.vit.embeddings.dropout.p in (0.0, 0.2)


def test_identity_error_raises_when_the_trainer_is_built(tmp_path):
    case = {"model": "transformers_convnext", "callbacks": [], "deterministic": False}
    with pytest.raises(Exception, match="Identity placeholders"):
        build_trainer(case, tmp_path, max_steps=1,
                      callbacks=[LateStochasticDepthCallback(p=0.5, cutoff_steps=1, on_identity="error")])


def test_late_stochastic_depth_on_swin_installs_drop_path_and_follows_the_schedule(tmp_path):
    case = {"model": "transformers_swin", "model_kwargs": {"drop_path_rate": 0.0}, "callbacks": [],
            "deterministic": False}
    trainer = build_trainer(case, tmp_path, max_steps=3, callbacks=[LateStochasticDepthCallback(p=0.5, cutoff_steps=2)])
    blocks = [block for stage in trainer.model.swin.encoder.layers for block in stage.blocks]
    assert [type(block.drop_path).__name__ for block in blocks] == ["SwinDropPath"] * 4
    seen = []
    hook = blocks[-1].drop_path.register_forward_pre_hook(
        lambda module, args: seen.append((trainer.state.global_step, module.drop_prob)))
    trainer.train()
    hook.remove()
    assert seen == [(0, 0.0), (1, 0.0), (2, 0.5)]
    assert [block.drop_path.drop_prob for block in blocks] == pytest.approx(block_rates(0.5, 4))


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        EarlyDropoutCallback(p=0.1)
    with pytest.raises(ValueError, match="exactly one of"):
        EarlyDropoutCallback(p=0.1, cutoff_steps=3, cutoff_epochs=1)
    with pytest.raises(ValueError, match="unknown target"):
        DropScheduleCallback(p=0.1, target="weights", cutoff_steps=2)
    with pytest.raises(ValueError, match="granularity"):
        EarlyDropoutCallback(p=0.1, cutoff_steps=2, granularity="batch")


def test_state_round_trips_through_constructor():
    callback = LateStochasticDepthCallback(p=0.3, cutoff_fraction=0.5)
    state = callback.state()
    assert state == {"args": {"p": 0.3, "schedule": "constant", "granularity": "step", "include_head": False,
                              "on_identity": "install", "cutoff_fraction": 0.5}, "attributes": {}}
    assert type(callback)(**state["args"]).state() == state


def test_metrics_reach_log_history_without_the_mixin(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_regtools.diagnostics import GradientDiagnosticsCallback
    from hf_regtools.testing.harness import build_model, dataset

    trainer = Trainer(model=build_model(VIT), train_dataset=dataset(VIT),
                      args=TrainingArguments(str(tmp_path), max_steps=2, logging_steps=1, use_cpu=True,
                                             report_to="none", per_device_train_batch_size=8),
                      callbacks=[EarlyDropoutCallback(p=0.4, cutoff_steps=2),
                                 GradientDiagnosticsCallback(every_n_steps=1, n_batches=2)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["hf_regtools/dropout_schedules/dropout_rate"] for entry in logged] == [0.4, 0.0]
    assert all("hf_regtools/diagnostics/gdv" in entry for entry in logged)


def _resume(tmp_path, trainer_class, model_name="transformers_vit"):
    from transformers import TrainingArguments

    from hf_regtools.testing import tiny_models
    from hf_regtools.testing.harness import dataset

    def run(output_dir, **train_kwargs):
        torch.manual_seed(0)
        args = TrainingArguments(str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=8,
                                 report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = trainer_class(getattr(tiny_models, model_name)(), args, train_dataset=dataset({"model": model_name}),
                                callbacks=[EarlyDropoutCallback(p=0.1, cutoff_steps=2)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(**train_kwargs)
        return trainer, [w for w in caught if "RegtoolsTrainerMixin" in str(w.message)]

    full, fresh_warnings = run(tmp_path / "full")
    resumed, resume_warnings = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    exact = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    return fresh_warnings, resume_warnings, exact


def test_resume_without_the_mixin_warns_where_it_is_inexact(tmp_path):
    from transformers import Trainer

    from hf_regtools._compat import checkpoint_layout_differs
    from hf_regtools.testing.tiny_models import transformers_vit
    from hf_regtools.trainer import RegtoolsTrainerMixin

    affected = checkpoint_layout_differs(transformers_vit())
    assert affected == transformers.__version__.startswith("5.")
    fresh, resumed, exact = _resume(tmp_path / "plain", Trainer)
    assert fresh == [] and len(resumed) == (1 if affected else 0) and exact != affected
    if affected:
        assert "Resuming ViTForImageClassification without RegtoolsTrainerMixin" in str(resumed[0].message)

    class MixinTrainer(RegtoolsTrainerMixin, Trainer):
        pass

    assert _resume(tmp_path / "mixin", MixinTrainer) == ([], [], True)
    assert _resume(tmp_path / "timm", Trainer, "timm_wrapped_vit") == ([], [], True)  # a layout 5.x keeps


def test_cutoff_zero_is_the_official_all_off_early_and_all_on_late_schedule(tmp_path):
    early, late = EarlyDropoutCallback(p=0.2, cutoff_epochs=0), LateStochasticDepthCallback(p=0.4, cutoff_steps=0)
    case = {"model": "transformers_swin", "callbacks": [], "deterministic": False}
    trainer = build_trainer(case, tmp_path, max_steps=2, callbacks=[early, late])
    blocks = [block for stage in trainer.model.swin.encoder.layers for block in stage.blocks]
    seen = []
    hook = blocks[-1].drop_path.register_forward_pre_hook(
        lambda module, args: seen.append((trainer.model.swin.embeddings.dropout.p, module.drop_prob)))
    trainer.train()
    hook.remove()
    assert early.cutoff_step == late.cutoff_step == 0
    assert seen == [(0.0, pytest.approx(0.4))] * 2
