"""Trainer runs record their hf_regtools techniques in the model card pushed to the Hub (fake Hub)."""

import uuid

import torch
from huggingface_hub import ModelCard, hf_hub_download
from safetensors import safe_open

from hf_regtools.dropout_schedules import EarlyDropoutCallback
from hf_regtools.hub import TechniqueUse, add_techniques_to_card
from hf_regtools.testing.harness import build_trainer

CASE = {"model": "transformers_vit", "model_kwargs": {"hidden_dropout_prob": 0.1}, "callbacks": [],
        "deterministic": False, "mixin": "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin"}


def test_push_to_hub_card_lists_every_technique(tmp_path, fake_hub):
    repo_id = f"org/run-{uuid.uuid4().hex[:8]}"
    trainer = build_trainer(CASE, tmp_path / "run", max_steps=2, hub_model_id=repo_id, max_grad_norm=0.0,
                            callbacks=[EarlyDropoutCallback(p=0.1, cutoff_steps=1)],
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.5}})
    trainer.train()
    trainer.push_to_hub()
    card = ModelCard.load(repo_id)
    assert {"hf-regtools", "alpha-svrg", "dropout-schedules"} <= set(card.data.tags)
    for text in ("## Training techniques (hf_regtools)", "arXiv:2311.05589", "arXiv:2303.01500",
                 "| `alpha0` | `0.5` |", "| `callback` | `EarlyDropoutCallback` |", "| `cutoff_steps` | `1` |"):
        assert text in card.text, text
    with safe_open(hf_hub_download(repo_id, "model.safetensors"), "pt") as weights:  # the Hub gets the original layout
        assert any(key.startswith("vit.encoder.layer.") for key in weights.keys())
    from transformers import ViTForImageClassification

    reloaded = ViTForImageClassification.from_pretrained(repo_id)
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name


def test_helper_for_custom_loops_is_idempotent(tmp_path):
    path = tmp_path / "README.md"
    ModelCard("---\nlicense: mit\ntags:\n- vision\n---\n# Model\n\nBody.\n").save(path)
    uses = [TechniqueUse("alpha_svrg", {"alpha0": 0.75})]
    add_techniques_to_card(path, uses)
    card = add_techniques_to_card(path, uses)
    assert card.data.tags == ["vision", "hf-regtools", "alpha-svrg"]
    assert card.text.count("## Training techniques (hf_regtools)") == 1 and "Body." in card.text
    assert ModelCard.load(path).text == card.text
