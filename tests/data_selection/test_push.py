"""`push_to_hub` of a two-head run (fake Hub): the repo holds the target classifier alone, its card records the
selection and `base_model`, a pull gives the trained target logits, and the token is never written or logged."""

import logging
import uuid

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments

from hf_regtools.data_selection import TwoHeadModel, TwoStreamTrainerMixin
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import dataset

SELECTION = {"source": "org/source", "class_ids": [4, 1], "weights": [1.25, 0.5], "num_examples": 20}
NAMES = ["cat", "dog", "bird"]
BUILDERS = {
    "transformers": ("transformers_vit", lambda: tiny_models.transformers_vit(hidden_dropout_prob=0.0)),
    "timm": ("timm_convnext_classifier",
             lambda: tiny_models.TimmClassifier(tiny_models.timm_convnext(depths=(1, 1, 1, 1)))),
}


class TwoStreamTrainer(TwoStreamTrainerMixin, Trainer):
    pass


@pytest.mark.parametrize("library, token_from", [("transformers", "hub_token"), ("timm", "HF_TOKEN")])
def test_push_to_hub_gives_the_target_classifier_and_a_card_with_the_selection(library, token_from, tmp_path,
                                                                              fake_hub, monkeypatch, caplog, capfd):
    secret = "hf_SECRETtoken" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", secret)
    repo_id = f"org/two-head-{uuid.uuid4().hex[:8]}"
    name, builder = BUILDERS[library]
    case = {"model": name}
    torch.manual_seed(0)
    net = TwoHeadModel(builder(), 3, 5, id2label=NAMES)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=0.05, optim="sgd", report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, hub_model_id=repo_id,
                             hub_token=secret if token_from == "hub_token" else None)
    run = TwoStreamTrainer(model=net, args=args, train_dataset=dataset(case, 16),
                           two_stream={"source_dataset": dataset(case, 20, seed=1, num_labels=5), "mu": 1.0,
                                       "selection": SELECTION, "base_model": "org/pretrained"})
    with caplog.at_level(logging.DEBUG):
        run.train()
        run.push_to_hub()

    files = fake_hub.files(repo_id)
    assert not any(path.startswith("checkpoint-") for path in files)
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "org/pretrained" and {"data-selection", "hf-regtools"} <= set(card.data.tags)
    assert "| source | `org/source` |" in card.text and "| 1 | 4 |  | 1.25 |" in card.text
    assert "| 2 | 1 |  | 0.5 |" in card.text and "TwoStreamTrainerMixin" in card.text

    x = torch.randn(3, 3, *[tiny_models.INPUTS[name]["image_size"]] * 2)
    net.eval()
    with torch.no_grad():
        expected = net(x)["logits"]
        if library == "transformers":
            from transformers import AutoModelForImageClassification

            pulled = AutoModelForImageClassification.from_pretrained(repo_id).eval()
            assert pulled.config.num_labels == 3 and pulled.config.id2label == dict(enumerate(NAMES))
            assert not any("source_head" in key for key in pulled.state_dict())
            logits = pulled(pixel_values=x).logits
        else:
            import timm

            pulled = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
            assert pulled.num_classes == 3
            logits = pulled(x)
    torch.testing.assert_close(logits, expected)

    out, err = capfd.readouterr()
    written = b"".join(path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file())
    assert secret.encode() not in written and secret.encode() not in b"".join(files.values())
    assert secret not in out + err + caplog.text
