"""The README recipe "timm models with the Trainer", end to end: train, resume from a checkpoint, push to the Hub
(the `hub_token` written nowhere: not even in the pickled `training_args.bin` that checkpoints and pushes carry).

Both ways a timm model reaches a `Trainer`: transformers' `TimmWrapperForImageClassification`, and a small user module
returning `{"loss", "logits"}`; the fake Hub (`fake_hub`) stands in for huggingface.co.
"""

import uuid

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_regtools.dropout_schedules import EarlyDropoutCallback, LateStochasticDepthCallback
from hf_regtools.optim import PaperWeightDecayMixin
from hf_regtools.testing.harness import dataset
from hf_regtools.testing.tiny_models import TimmClassifier, timm_convnext, timm_convnext_classifier, timm_wrapped_vit
from hf_regtools.trainer import RegtoolsTrainerMixin


class MyTrainer(PaperWeightDecayMixin, RegtoolsTrainerMixin, Trainer):
    pass


RECIPES = {
    "TimmWrapperForImageClassification": ("timm_wrapped_vit", timm_wrapped_vit,
                                          lambda: EarlyDropoutCallback(p=0.1, cutoff_steps=3)),
    "user module": ("timm_convnext_classifier", timm_convnext_classifier,
                    lambda: LateStochasticDepthCallback(p=0.2, cutoff_steps=2)),
}


def train(output_dir, build, callback, name, *, resume_from=None, **args):
    torch.manual_seed(0)
    arguments = TrainingArguments(str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=8,
                                  learning_rate=4e-3, weight_decay=0.05, max_grad_norm=0.0, report_to="none",
                                  use_cpu=True, disable_tqdm=True, **args)
    trainer = MyTrainer(build(), arguments, train_dataset=dataset({"model": name}, 20), callbacks=[callback()])
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.mark.parametrize("name, build, callback", RECIPES.values(), ids=list(RECIPES))
def test_train_resume_and_push_a_timm_model(name, build, callback, tmp_path, fake_hub):
    repo_id = f"org/timm-{uuid.uuid4().hex[:8]}"
    secret = "hf_SECRETtoken" + uuid.uuid4().hex
    full = train(tmp_path / "full", build, callback, name, hub_model_id=repo_id, hub_token=secret)
    resumed = train(tmp_path / "resumed", build, callback, name, resume_from=str(tmp_path / "full" / "checkpoint-2"))
    for (key, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), key
    step2 = {key.removeprefix("timm_model."): value  # transformers 4.57 saves TimmWrapper weights in timm's layout
             for key, value in load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors").items()}
    final = {key.removeprefix("timm_model."): value for key, value in full.model.state_dict().items()}
    assert step2.keys() == final.keys() and any(not torch.equal(step2[key], final[key]) for key in final)

    no_decay = {id(p) for group in full.optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    kept = ["timm_model.cls_token", "timm_model.pos_embed"] if name == "timm_wrapped_vit" else [
        "backbone.stages.1.blocks.0.gamma"]
    assert all(id(full.model.get_parameter(key)) in no_decay for key in kept)

    full.push_to_hub()
    written = b"".join(path.read_bytes() for path in (tmp_path / "full").rglob("*") if path.is_file())
    assert (tmp_path / "full" / "checkpoint-2" / "training_args.bin").is_file()
    assert secret.encode() not in written and secret.encode() not in b"".join(fake_hub.files(repo_id).values())
    card = ModelCard.load(repo_id)
    assert {"hf-regtools", "dropout-schedules"} <= set(card.data.tags)
    assert f"| `callback` | `{type(callback()).__name__}` |" in card.text
    if name == "timm_wrapped_vit":
        from transformers import TimmWrapperForImageClassification

        reloaded = TimmWrapperForImageClassification.from_pretrained(repo_id)
    else:
        reloaded = TimmClassifier(timm_convnext())
        reloaded.load_state_dict(load_file(hf_hub_download(repo_id, "model.safetensors")))
    for (key, a), (_, b) in zip(full.model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), key
