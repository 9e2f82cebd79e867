"""Classifier heads and pooled features across the fixture models (`adapters.heads`)."""

import pytest
import torch
from torch import nn

from hf_regtools.adapters import UnsupportedModelError
from hf_regtools.adapters.heads import feature_dim, find_classifier_head, head_replaced, pooled_features
from hf_regtools.testing import tiny_models

IMAGE_MODELS = ["timm_vit", "timm_convnext", "timm_resnet_classifier", "timm_wrapped_vit", "transformers_vit",
                "transformers_convnext", "transformers_resnet", "transformers_swin"]


def _inputs(name: str, batch: int = 3):
    spec = tiny_models.INPUTS.get(name) or {"timm_vit": {"image_size": 16}, "timm_convnext": {"image_size": 32}}[name]
    if "image_size" in spec:
        return torch.randn(batch, 3, spec["image_size"], spec["image_size"])
    return {"input_ids": torch.randint(1, spec["vocab_size"], (batch, spec["length"])),
            "attention_mask": torch.ones(batch, spec["length"], dtype=torch.long)}


def _logits(model, inputs):
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return output if isinstance(output, torch.Tensor) else output["logits"]


@pytest.mark.parametrize("name", [*IMAGE_MODELS, "transformers_bert"])
def test_head_applied_to_the_pooled_features_gives_the_logits(name):
    torch.manual_seed(0)
    model = getattr(tiny_models, name)().eval()
    inputs = _inputs(name)
    head = find_classifier_head(model)
    assert isinstance(head.linear, nn.Linear) and model.get_submodule(head.qualified_name) is head.linear
    with torch.no_grad():
        features = pooled_features(model, inputs)
        logits = _logits(model, inputs)
    assert features.shape == (3, feature_dim(model))
    torch.testing.assert_close(head.linear(features), logits, rtol=1e-5, atol=1e-6)
    assert model.get_submodule(head.qualified_name) is head.linear


def test_backbone_without_head_gives_its_pooled_output():
    from transformers import ResNetModel

    timm_backbone = tiny_models.timm_resnet(num_classes=0).eval()
    assert find_classifier_head(timm_backbone) is None
    pixels = torch.randn(2, 3, 32, 32)
    assert pooled_features(timm_backbone, pixels).shape == (2, feature_dim(timm_backbone)) == (2, 64)
    classifier = tiny_models.transformers_resnet().eval()
    backbone = ResNetModel(classifier.config).eval()
    backbone.load_state_dict(classifier.resnet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(backbone, pixels), pooled_features(classifier, pixels))
    assert feature_dim(backbone) == 64


def test_head_replaced_restores_the_head_after_an_error():
    model = tiny_models.transformers_resnet()
    head = find_classifier_head(model)
    with pytest.raises(RuntimeError), head_replaced(model, nn.Identity()):
        raise RuntimeError("inside")
    assert model.get_submodule(head.qualified_name) is head.linear


def test_a_model_of_neither_library_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="MLPClassifier holds no timm or transformers model"):
        find_classifier_head(tiny_models.mlp_classifier())
