"""timm VGG: convolution channels follow the official one-set-per-(D, d) rule, BatchNorm statistics follow their
channels, the head MLP's widths are named, and students without the teacher's layers are refused."""

import pytest
import torch

from hf_regtools.adapters import UnsupportedModelError, detect_family
from hf_regtools.testing.tiny_models import timm_vgg
from hf_regtools.weight_selection import WeightSelectionError, initialize_student, select_weights


def trained_statistics(model):
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    return model.eval()


@pytest.mark.parametrize("mode", ["uniform", "random"])
def test_stem_output_and_every_convolution_keep_their_channel_sets(mode):
    torch.manual_seed(0)
    teacher = trained_statistics(timm_vgg(widths=(16, 32, 32), mlp_ratio=1 / 256))
    student = timm_vgg(widths=(8, 16, 16), mlp_ratio=1 / 512).eval()
    assert detect_family(teacher).label == "timm vgg"
    report = select_weights(teacher, student, mode=mode, seed=3)
    first, second, mlp = report.index_sets[16, 8], report.index_sets[32, 16], report.index_sets["fc1"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(student.features[:2](x), teacher.features[:2](x)[:, first])  # convolution and BatchNorm
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["features.1.running_var"], t["features.1.running_var"][first])
    assert s["features.1.num_batches_tracked"] == t["features.1.num_batches_tracked"] == 1
    assert torch.equal(s["features.4.weight"], t["features.4.weight"][second][:, first])
    assert torch.equal(s["features.7.weight"], t["features.7.weight"][second][:, second])
    assert torch.equal(s["pre_logits.fc1.weight"], t["pre_logits.fc1.weight"][mlp][:, second])
    assert torch.equal(s["pre_logits.fc2.weight"], t["pre_logits.fc2.weight"][:, mlp])
    assert "head.fc.weight" in report.skipped and student(x).shape == (2, 3)


def test_students_without_the_teachers_layers_and_bare_classes_get_clear_errors():
    teacher = timm_vgg(widths=(16, 32, 32))
    with pytest.raises(WeightSelectionError, match=r"features\.7\.weight.*the student must have the teacher's layers"):
        select_weights(teacher, timm_vgg(widths=(8, 16)))
    with pytest.raises(UnsupportedModelError, match="built from its class, not by timm.create_model"):
        initialize_student(teacher, timm_vgg(widths=(8, 16, 16)))
