import pytest
from safetensors import safe_open

from hf_regtools.adapters import FAMILIES, detect_family, supported_families
from hf_regtools.testing.tiny_models import MODELS, transformers_swin


def test_every_family_has_a_tiny_model():
    assert {" ".join(key) for key in MODELS} == set(supported_families())


@pytest.mark.parametrize("key", sorted(MODELS), ids="-".join)
def test_signatures_are_mutually_exclusive(key):
    keys = list(MODELS[key]().state_dict())
    assert [family.label for family in FAMILIES if family.matches(keys)] == [" ".join(key)]


def test_transformers_swin_is_detected_in_the_checkpoint_layout(tmp_path):
    transformers_swin().save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(key.endswith("attention.self.relative_position_bias_table") for key in keys)
    assert detect_family(keys).label == "transformers swin"
