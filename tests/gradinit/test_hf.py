"""GradInit on tiny transformers / timm models and through the Trainer callback (spec §6.9)."""

import json
import types

import pytest
import torch

from hf_regtools.gradinit import GradInitCallback, GradInitConfig, gradinit_, nio_
from hf_regtools.gradinit.callback import REPORT_FILE, _trainer_batches
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import build_trainer, dataset

BERT = {"model": "transformers_bert", "callbacks": [], "deterministic": False}


def dict_batches(model_name, count=4, size=4):
    data = dataset({"model": model_name}, size=count * size)
    return [data[i * size:(i + 1) * size] for i in range(count)]


@pytest.mark.parametrize("model_name", ["transformers_bert", "transformers_vit", "transformers_resnet"])
def test_transformers_models_keep_parameter_identity_and_every_tensor_gets_a_scale(model_name):
    torch.manual_seed(0)
    model = getattr(tiny_models, model_name)()
    model.train()
    parameters = {name: p for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    report = gradinit_(model, dict_batches(model_name), iterations=3, lr=1e-2)
    assert {name: p for name, p in model.named_parameters()} == parameters
    assert all(a is b for a, b in zip(parameters.values(), dict(model.named_parameters()).values()))
    assert set(report.scales) == set(parameters)
    assert model.training and all(m.training for m in model.modules())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert report.constraint_steps + report.objective_steps == 3
    if model_name == "transformers_bert":
        changed = [name for name, s in report.scales.items() if s != 1.0]
        assert any("LayerNorm" in name for name in changed) and any("embeddings" in name for name in changed)
        assert any("attention.self.query" in name for name in changed)


def test_timm_resnet_with_batchnorm_tuple_batches():
    torch.manual_seed(0)
    model = tiny_models.timm_resnet(num_classes=3)
    identities = [id(p) for p in model.parameters()]
    running = model.bn1.running_var.clone()
    batches = [(b["pixel_values"], b["labels"]) for b in dict_batches("timm_resnet_classifier")]
    report = gradinit_(model, batches, iterations=3, lr=1e-2, module_types="reference")
    assert identities == [id(p) for p in model.parameters()]
    assert torch.equal(model.bn1.running_var, running) and model.bn1.track_running_stats
    assert any(name.startswith("bn1") and s != 1.0 for name, s in report.scales.items())
    assert nio_(model, [(torch.cat([x, x]), torch.cat([y, y])) for x, y in batches], iterations=2).history


def test_accelerate_autocast_patch_is_bypassed_and_restored():
    torch.manual_seed(0)
    model = tiny_models.transformers_bert()
    calls = []

    def patched(self, *args, **kwargs):
        calls.append(1)
        return self._original_forward(*args, **kwargs)

    model._original_forward = model.forward
    model.forward = types.MethodType(patched, model)
    gradinit_(model, dict_batches("transformers_bert"), iterations=2)
    assert not calls
    model(**dict_batches("transformers_bert", 1)[0])
    assert calls == [1]


def test_callback_runs_once_at_step_0_writes_the_report_and_logs_metrics(tmp_path):
    callback = GradInitCallback(iterations=3, lr=1e-2)
    trainer = build_trainer(BERT, tmp_path, max_steps=2, callbacks=[callback])
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    calls = []
    original = callback.on_train_begin

    def spy(args, state, control, **kwargs):
        calls.append(state.global_step)
        return original(args, state, control, **kwargs)

    callback.on_train_begin = spy
    trainer.train()
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["constraint_steps"] + report["objective_steps"] == 3
    metrics = trainer.technique_metrics()
    assert metrics["hf_regtools/gradinit/constraint_steps"] == report["constraint_steps"]
    assert "hf_regtools/gradinit/final_gnorm" in metrics
    assert any("hf_regtools/gradinit/objective_steps" in entry for entry in trainer.state.log_history)
    assert any(not torch.equal(initial[n], p) for n, p in trainer.model.named_parameters())
    first = callback.report
    trainer.train()  # a second train() with the same callback does not re-initialise
    assert callback.report is first and calls == [0, 0]
    use = callback.technique_use()
    assert use.name == "gradinit" and use.settings["iterations"] == 3


def test_callback_is_skipped_when_resuming(tmp_path):
    build_trainer(BERT, tmp_path / "full", max_steps=2, save_steps=2,
                  callbacks=[GradInitCallback(iterations=2)]).train()
    fresh = GradInitCallback(iterations=2)
    resumed = build_trainer(BERT, tmp_path / "resumed", max_steps=3, callbacks=[fresh],
                            restore_callback_states_from_checkpoint=False)
    ran = []
    import hf_regtools.gradinit.functional as functional

    original = functional.gradinit_
    functional.gradinit_ = lambda *a, **k: ran.append(1) or original(*a, **k)
    try:
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    finally:
        functional.gradinit_ = original
    assert not ran and fresh.report is None and not (tmp_path / "resumed" / REPORT_FILE).exists()


def test_training_after_the_callback_equals_training_the_pre_initialised_model(tmp_path):
    """The callback leaves the RNG and the data order alone: with dropout on, training after GradInit in the callback
    equals GradInit applied beforehand on the same batches and then plain training."""
    model_kwargs = {"hidden_dropout_prob": 0.2}
    case = {**BERT, "model_kwargs": model_kwargs}
    config = GradInitConfig(iterations=3, lr=1e-2)
    with_callback = build_trainer(case, tmp_path / "a", max_steps=3, callbacks=[GradInitCallback(config)])
    with_callback.train()

    before = build_trainer(case, tmp_path / "b", max_steps=3, callbacks=[])
    args = before.args
    loader = before.get_train_dataloader()
    gradinit_(before.model, _trainer_batches(args, loader, nio=False), config=config)
    before.train()
    for (name, a), b in zip(with_callback.model.named_parameters(), before.model.parameters()):
        assert torch.equal(a, b), name


def test_callback_config_round_trips_through_its_state():
    callback = GradInitCallback({"iterations": 4, "betas": [0.9, 0.98]}, gamma=float("inf"), module_types="reference")
    restored = GradInitCallback(**json.loads(json.dumps(callback.state()["args"])))
    assert restored.config == callback.config
    assert callback.config.module_types == ("Conv2d", "Linear", "BatchNorm2d")
    with pytest.raises(TypeError, match="unknown GradInit settings"):
        GradInitCallback(step=3)
