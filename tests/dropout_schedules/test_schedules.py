import numpy as np
import pytest
import torch

from hf_regtools.adapters import UnsupportedModelError, detect_family, library_adapter, supported_families
from hf_regtools.adapters.sites import drop_path_blocks, drop_path_slots, dropout_sites
from hf_regtools.dropout_schedules import DropRateController, apply_drop_rate, block_rates
from hf_regtools.schedules import drop_schedule, drop_schedule_array
from hf_regtools.testing.tiny_models import (MODELS, timm_convnext, timm_swin, timm_vit, transformers_convnext,
                                             transformers_swin, transformers_vit)

SCHEDULED = {key: build for key, build in MODELS.items() if " ".join(key) in supported_families("dropout_schedules")}
STOCHASTIC_DEPTH = sorted(key for key in SCHEDULED if key != ("timm", "vgg")  # no residual blocks
                          and (key[0] == "timm" or key[1] not in ("vit", "deit", "llama", "gpt2", "bert", "roberta")))
DROPOUT = sorted(key for key in SCHEDULED if key[0] == "timm" or "convnext" not in key[1])
BLOCKS = {"vit": 4, "deit": 4, "convnext": 9, "convnextv2": 9, "swin": 4}


def official_drop_scheduler(drop_rate, epochs, niter_per_ep, cutoff_epoch=0, mode="standard", schedule="constant"):
    """Copy of `facebookresearch/dropout` `drop_scheduler.py`."""
    assert mode in ["standard", "early", "late"]
    if mode == "standard":
        return np.full(epochs * niter_per_ep, drop_rate)
    early_iters = cutoff_epoch * niter_per_ep
    late_iters = (epochs - cutoff_epoch) * niter_per_ep
    if mode == "early":
        assert schedule in ["constant", "linear"]
        if schedule == "constant":
            early_schedule = np.full(early_iters, drop_rate)
        elif schedule == "linear":
            early_schedule = np.linspace(drop_rate, 0, early_iters)
        final_schedule = np.concatenate((early_schedule, np.full(late_iters, 0)))
    elif mode == "late":
        assert schedule in ["constant"]
        early_schedule = np.full(early_iters, 0)
        final_schedule = np.concatenate((early_schedule, np.full(late_iters, drop_rate)))
    assert len(final_schedule) == epochs * niter_per_ep
    return final_schedule


@pytest.mark.parametrize("mode, schedule", [("early", "linear"), ("early", "constant"), ("late", "constant"),
                                            ("standard", "constant")])
@pytest.mark.parametrize("p, epochs, n, cutoff", [(0.1, 4, 5, 2), (0.5, 3, 7, 1), (0.3, 6, 1, 5), (0.2, 3, 4, 0)])
def test_schedule_parity_with_official(mode, schedule, p, epochs, n, cutoff):
    official = official_drop_scheduler(p, epochs, n, cutoff, mode, schedule)
    array = drop_schedule_array(p=p, total_steps=epochs * n, cutoff_step=cutoff * n, mode=mode, schedule=schedule)
    assert np.array_equal(array, official)
    ours = [drop_schedule(t, p=p, cutoff_step=cutoff * n, mode=mode, schedule=schedule) for t in range(epochs * n)]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-15)


def test_spec_example_early_linear():
    values = [drop_schedule(t, p=0.1, cutoff_step=10, schedule="linear") for t in range(20)]
    np.testing.assert_allclose(values[:10], np.linspace(0.1, 0, 10))
    assert values[0] == 0.1 and values[9] == 0.0 and values[10:] == [0.0] * 10
    assert round(values[1], 4) == 0.0889 and round(values[8], 4) == 0.0111


def test_schedule_validation():
    with pytest.raises(ValueError, match="late mode has only the constant schedule"):
        drop_schedule(0, p=0.1, cutoff_step=3, mode="late", schedule="linear")
    with pytest.raises(ValueError, match="unknown mode"):
        drop_schedule(0, p=0.1, cutoff_step=3, mode="middle")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_schedule(0, p=1.5, cutoff_step=3)
    with pytest.raises(ValueError, match="cutoff_step must be >= 0"):
        drop_schedule(0, p=0.1, cutoff_step=-1)


def test_per_block_rates_vit_and_convnext():
    model = timm_vit(depth=12, drop_path_rate=0.1)
    DropRateController(model, target="drop_path").set(0.5)
    expected = torch.linspace(0, 0.5, 12)
    for i, block in enumerate(model.blocks):
        assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == expected[i].item()
    convnext = timm_convnext(depths=(2, 2, 6, 2))
    DropRateController(convnext, target="drop_path").set(0.5)
    flat = [b.drop_path.drop_prob for stage in convnext.stages for b in stage.blocks]
    assert flat == block_rates(0.5, 12) and flat[0] == 0.0


def forward(model, x):
    return model(pixel_values=x).logits if type(model).__module__.startswith("transformers.") else model(x)


@pytest.mark.parametrize("build, side", [
    (lambda: timm_vit(drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.2, pos_drop_rate=0.2), 16),
    (lambda: transformers_vit(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), 16),
    (lambda: timm_convnext(drop_rate=0.2), 32),
    (lambda: timm_swin(drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.0), 32),
    (lambda: transformers_swin(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, drop_path_rate=0.0), 32),
])
def test_dropout_coverage(build, side):
    torch.manual_seed(0)
    model = build()
    controller = DropRateController(model, target="dropout", include_head=True)
    controller.set(0.37)
    for site in dropout_sites(model, include_head=True):
        assert site.get() == 0.37
    scanned = [(name, attr) for name, module in model.named_modules() for attr, value in vars(module).items()
               if isinstance(value, float) and "drop" in attr and "path" not in attr and attr != "drop_rate"]
    covered = {(s.name.rpartition(".")[0] if s.attribute != "p" else s.name, s.attribute)
               for s in dropout_sites(model, include_head=True)}
    assert all(item in covered for item in scanned), scanned
    controller.set(0.0)
    x = torch.randn(2, 3, side, side)
    model.train()
    trained = forward(model, x)
    model.eval()
    assert torch.allclose(trained, forward(model, x), atol=1e-6)


def test_head_dropout_only_when_asked():
    model = timm_vit(drop_rate=0.2)
    apply_drop_rate(model, 0.3)
    assert model.head_drop.p == 0.2
    apply_drop_rate(model, 0.3, include_head=True)
    assert model.head_drop.p == 0.3


@pytest.mark.parametrize("build", [transformers_convnext, transformers_swin, timm_swin])
def test_identity_trap(build):
    torch.manual_seed(0)
    model = build(drop_path_rate=0.0)
    with pytest.raises(UnsupportedModelError, match="Identity placeholders"):
        DropRateController(model, target="drop_path", on_identity="error")
    params_before = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert torch.equal(forward(model, x), forward(model, x))
    controller = DropRateController(model, target="drop_path")
    controller.set(0.5)
    assert not torch.equal(forward(model, x), forward(model, x))
    assert [id(p) for p in model.parameters()] == params_before
    assert drop_path_blocks(model)[0][0].get() == 0.0


@pytest.mark.parametrize("build", [timm_vit, transformers_convnext, transformers_swin, timm_swin])
def test_a_model_built_with_stochastic_depth_needs_no_surgery(build):
    """Every library builds the first block (rate 0 under the depth rule) as Identity: that is no placeholder."""
    model = build(drop_path_rate=0.1)
    names = [name for name, _ in model.named_modules()]
    controller = DropRateController(model, target="drop_path", on_identity="error")
    assert [name for name, _ in model.named_modules()] == names
    controller.set(0.3)
    assert controller.sites[0] == [] or all(site.get() == 0.0 for site in controller.sites[0])
    assert len(controller.sites) > 1 and all(site.get() == pytest.approx(0.3) for site in controller.sites[-1])


def test_models_without_sites_raise():
    with pytest.raises(UnsupportedModelError, match="no stochastic depth"):
        DropRateController(transformers_vit(), target="drop_path")
    with pytest.raises(UnsupportedModelError, match="no dropout site"):
        DropRateController(transformers_convnext(), target="dropout")


@pytest.mark.parametrize("key", sorted(SCHEDULED), ids="-".join)
def test_every_supported_family_has_its_sites_updated(key):
    model = MODELS[key]()
    if key in STOCHASTIC_DEPTH:
        drop_path = DropRateController(model, target="drop_path")
        drop_path.set(0.4)
        slots = drop_path_slots(model)
        assert {type(module) for _, module in slots} == {library_adapter(key[0]).drop_path_class(detect_family(model))}
        rates = [[site.get() for site in block] for block in drop_path_blocks(model)]
        assert len(rates) == BLOCKS[key[1]] and sum(map(len, rates)) == len(slots)
        assert rates == [[rate] * len(block) for rate, block in zip(block_rates(0.4, len(rates)), rates)]
    else:
        with pytest.raises(UnsupportedModelError, match="has no stochastic"):
            DropRateController(model, target="drop_path")
    if key in DROPOUT:
        DropRateController(model, target="dropout", include_head=True).set(0.25)
        modules = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
        floats = [value for module in model.modules() for attribute, value in vars(module).items()
                  if isinstance(value, float) and "drop" in attribute and attribute not in ("drop_prob", "drop_rate")]
        assert modules or floats  # Llama-layout decoders have attention-dropout rates only
        assert all(module.p == 0.25 for module in modules) and all(value == 0.25 for value in floats)
    else:
        with pytest.raises(UnsupportedModelError, match="no dropout site"):
            DropRateController(model, target="dropout")


@pytest.mark.parametrize("key", STOCHASTIC_DEPTH, ids="-".join)
def test_depth_rule_matches_the_rates_each_library_builds(key):
    built = MODELS[key](drop_path_rate=0.3)
    expected = [getattr(module, "drop_prob", 0.0) for _, module in drop_path_slots(built)]
    model = MODELS[key](drop_path_rate=0.0)
    DropRateController(model, target="drop_path").set(0.3)
    assert [module.drop_prob for _, module in drop_path_slots(model)] == pytest.approx(expected, abs=1e-7)
