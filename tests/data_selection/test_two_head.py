"""TwoHeadModel: heads as the spec initialises them, gradient separation, the saved target classifier."""

import json

import pytest
import torch

from hf_regtools.adapters.heads import find_classifier_head
from hf_regtools.data_selection import TwoHeadModel, fixmatch_loss, two_stream_loss
from hf_regtools.data_selection.two_head import OFFICIAL_HEAD_INIT_STD
from hf_regtools.testing import tiny_models

BUILDERS = {
    "transformers_resnet": (tiny_models.transformers_resnet, 32),
    "timm_resnet_classifier": (tiny_models.timm_resnet_classifier, 32),
    "timm_convnext": (lambda: tiny_models.timm_convnext(depths=(1, 1, 1, 1)), 32),
    "timm_wrapped_vit": (lambda: tiny_models.timm_wrapped_vit(depth=2), 16),
}


def build(name, n_target=4, n_source=7):
    torch.manual_seed(0)
    builder, size = BUILDERS[name]
    return TwoHeadModel(builder(), n_target, n_source), size


def no_gradient(tensor):
    return tensor.grad is None or torch.count_nonzero(tensor.grad) == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_heads_are_reinitialised_as_official_and_the_backbone_keeps_its_parameters(name):
    torch.manual_seed(0)
    builder, size = BUILDERS[name]
    backbone = builder()
    old_head = list(find_classifier_head(backbone).linear.parameters())  # references: ids stay unique
    kept = [p for p in backbone.parameters() if not any(p is q for q in old_head)]
    model = TwoHeadModel(backbone, 4, 7)
    now = {id(p) for p in model.parameters()}
    assert {id(p) for p in kept} <= now and not {id(p) for p in old_head} & now  # the same Parameter objects
    assert model.target_head.out_features == 4 and model.source_head.out_features == 7
    for head in (model.target_head, model.source_head):
        assert torch.equal(head.bias, torch.zeros_like(head.bias))
    torch.manual_seed(1)
    big = TwoHeadModel(builder(), 500, 500)
    weights = torch.cat([big.target_head.weight.flatten(), big.source_head.weight.flatten()])
    assert abs(weights.std().item() - OFFICIAL_HEAD_INIT_STD) < 0.05 * OFFICIAL_HEAD_INIT_STD
    assert abs(weights.mean().item()) < 0.05 * OFFICIAL_HEAD_INIT_STD


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_head_gets_gradient_only_from_its_own_samples(name):
    model, size = build(name)
    model.train()
    x_t, x_s = torch.randn(3, 3, size, size), torch.randn(5, 3, size, size)
    out = model(x_t, source_pixel_values=x_s)
    assert out["logits"].shape == (3, 4) and out["source_logits"].shape == (5, 7)

    out["source_logits"].sum().backward()  # the source samples only
    assert no_gradient(model.target_head.weight) and no_gradient(model.target_head.bias)
    assert model.source_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model(x_t, source_pixel_values=x_s)
    out["logits"].sum().backward()  # the target samples only
    assert no_gradient(model.source_head.weight) and no_gradient(model.source_head.bias)
    assert model.target_head.weight.grad.abs().sum() > 0


def test_source_images_share_the_batchnorm_statistics_of_one_forward():
    model, size = build("transformers_resnet")
    model.train()
    x_t, x_s = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size) * 3 + 1
    mixed = model(x_t, source_pixel_values=x_s)["logits"]
    alone = model(x_t)["logits"]
    assert not torch.allclose(mixed, alone, atol=1e-4)  # BN statistics over the mixed batch
    model.eval()
    torch.testing.assert_close(model(x_t, source_pixel_values=x_s)["logits"], model(x_t)["logits"])


def test_losses_from_labels():
    model, size = build("timm_resnet_classifier")
    x_t, y_t = torch.randn(3, 3, size, size), torch.tensor([0, 1, 3])
    x_s, y_s = torch.randn(2, 3, size, size), torch.tensor([6, 2])
    out = model(x_t, labels=y_t, source_pixel_values=x_s, source_labels=y_s)
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(out["logits"], y_t))
    torch.testing.assert_close(out["source_loss"], torch.nn.functional.cross_entropy(out["source_logits"], y_s))
    loss, parts = two_stream_loss(out["logits"], y_t, out["source_logits"], y_s, lambda_u=0.3)
    torch.testing.assert_close(loss, out["loss"] + 0.3 * out["source_loss"])
    assert set(parts) == {"loss_target", "loss_source"}


def test_fixmatch_loss_against_a_hand_computation():
    weak = torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.0, 0.0, 5.0]])
    strong = torch.tensor([[1.0, 0.5, -1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]])
    for threshold, temperature in ((0.0, 1.0), (0.6, 1.0), (0.6, 0.5), (0.99999, 1.0)):
        p = [[v / sum(row) for v in row] for row in
             [[torch.tensor(w / temperature).exp().item() for w in r] for r in weak.tolist()]]
        log_q = [[s - torch.tensor(r).exp().sum().log().item() for s in r] for r in strong.tolist()]
        mask = [1.0 if max(row) >= threshold else 0.0 for row in p]
        terms = [-sum(pc * lq for pc, lq in zip(pr, lr)) for pr, lr in zip(p, log_q)]
        expected = sum(m * t for m, t in zip(mask, terms)) / max(sum(mask), 1.0)
        loss, got_mask = fixmatch_loss(strong, weak, threshold=threshold, temperature=temperature)
        assert got_mask.tolist() == mask
        assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    weak.requires_grad_(True)
    strong.requires_grad_(True)
    fixmatch_loss(strong, weak)[0].backward()
    assert no_gradient(weak) and not no_gradient(strong)  # pseudo-labels are detached


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="n_source must be a positive int"):
        TwoHeadModel(tiny_models.transformers_resnet(), 3, 0)
    with pytest.raises(ValueError, match="id2label names 2 classes"):
        TwoHeadModel(tiny_models.transformers_resnet(), 3, 4, id2label=["a", "b"])


SELECTION = {"source": "org/source", "target": "org/target", "backbone": "org/backbone", "class_ids": [7, 3, 9],
             "class_names": ["seven", "three", "nine"], "weights": [1.5, 0.75, 0.25], "num_examples": 120}


def test_saved_transformers_model_loads_as_an_ordinary_classifier(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageClassification

    model, size = build("transformers_resnet")
    model.eval()
    model.save_pretrained(tmp_path, selection=SELECTION, base_model="org/backbone")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.num_labels == 4 and type(loaded).__name__ == "ResNetForImageClassification"
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(x)["logits"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/backbone" and "data-selection" in card.data.tags
    assert "| 1 | 7 | seven | 1.5 |" in card.text and "org/source" in card.text


def test_saved_timm_model_loads_with_create_model(tmp_path):
    import timm

    model, size = build("timm_convnext")
    model.eval()
    model.save_pretrained(tmp_path, selection=SELECTION)
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 4
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(loaded(x), model(x)["logits"])


def test_a_transformers_backbone_without_head_becomes_its_classifier(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    backbone = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    kept = {id(p) for p in backbone.parameters()}
    model = TwoHeadModel(backbone, 3, 5).eval()
    assert kept <= {id(p) for p in model.parameters()}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(x)["logits"])
