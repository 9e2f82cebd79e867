"""`StochNormCallback` with the Trainer: surgery at `on_init_end`, refusal when too late, metrics, state and card.

Resuming from a checkpoint equals the uninterrupted run bit for bit (masks included: the Trainer restores torch's
generator) in the generic harness, `tests/test_harness.py -k stochnorm`, on transformers and timm ResNets.
"""

import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools.hub import add_techniques_to_card
from hf_regtools.stochnorm import StochNormCallback, stochnorm_layers
from hf_regtools.testing.harness import build_trainer

CASE = {"model": "transformers_resnet", "callbacks": [], "deterministic": False}


def test_trainer_converts_at_init_end_and_trains_the_same_parameters(tmp_path):
    callback = StochNormCallback(p=0.3)
    trainer = build_trainer(CASE, tmp_path, max_steps=2, callbacks=[callback])
    layers = stochnorm_layers(trainer.model)
    assert len(layers) == 12 and all(layer.p == 0.3 for layer in layers.values())
    first = next(iter(layers.values()))
    weight, steps = first.weight.detach().clone(), first.num_batches_tracked.item()
    trainer.train()
    assert any(first.weight is p for group in trainer.optimizer.param_groups for p in group["params"])
    assert not torch.equal(first.weight, weight) and first.num_batches_tracked.item() == steps + 2
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["hf_regtools/stochnorm/p"] == 0.3 and entry["hf_regtools/stochnorm/layers"] == 12
                          for entry in logged)
    assert trainer.technique_metrics() == {"hf_regtools/stochnorm/p": 0.3, "hf_regtools/stochnorm/layers": 12}


def test_a_callback_added_after_init_refuses_before_training(tmp_path):
    trainer = build_trainer(CASE, tmp_path, max_steps=2, callbacks=[])
    trainer.add_callback(StochNormCallback(p=0.5))
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"found no StochNorm layer in ResNetForImageClassification at the start of "
                                           r"training: the callback converts the model at on_init_end.*"
                                           r"callbacks=\[StochNormCallback\(p=\.\.\.\)\]"):
        trainer.train()
    assert all(torch.equal(p, weights[name]) for name, p in trainer.model.named_parameters())


def test_a_model_converted_beforehand_needs_no_callback_but_is_not_converted_twice(tmp_path):
    from hf_regtools.stochnorm import apply_stochnorm
    from hf_regtools.testing.tiny_models import transformers_resnet

    model = transformers_resnet()
    apply_stochnorm(model, p=0.5)
    with pytest.raises(ValueError, match="already converted"):
        build_trainer(CASE, tmp_path, max_steps=1, model=model, callbacks=[StochNormCallback()])


def test_state_round_trip_technique_use_and_model_card():
    callback = StochNormCallback(0.4, include=[r"encoder"], exclude=r"embedder")
    state = callback.state()
    assert state == {"args": {"p": 0.4, "include": ["encoder"], "exclude": "embedder"}, "attributes": {}}
    assert type(callback)(**state["args"]).state() == state
    use = callback.technique_use()
    assert use.name == "stochnorm" and use.settings["callback"] == "StochNormCallback" and use.settings["p"] == 0.4
    card = add_techniques_to_card(ModelCard("---\nlicense: mit\n---\n# Model\n"), [use])
    assert "stochnorm" in card.data.tags
    assert ("Kou et al., Stochastic Normalization, NeurIPS 2020 ([paper](https://proceedings.neurips.cc/paper/2020/"
            "file/bc573864331a9e42e4511de6f678aa83-Paper.pdf))") in card.text
    with pytest.raises(ValueError, match="p must be a probability"):
        StochNormCallback(p=2.0)
    with pytest.raises(ValueError, match="exclude must be a regex"):
        StochNormCallback(exclude="[")
