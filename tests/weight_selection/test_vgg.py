"""timm VGG: convolution channels follow the official one-set-per-(D, d) rule, BatchNorm statistics follow their
channels, the head MLP's widths are named, layer selection maps blocks within stages, and bad students are
refused."""

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


@pytest.mark.parametrize("layers, stage_one", [("first", [0, 1]), ("last", [0, 2]), ("even", [0, 2]),
                                              ("0;0,1", [0, 1])])
def test_layer_selection_maps_blocks_within_stages_and_keeps_each_stages_first(layers, stage_one):
    teacher = timm_vgg(widths=(16, 32, 32, 32))  # stage 0: one convolution; stage 1: three (features 4, 7, 10)
    student = timm_vgg(widths=(8, 16, 16))
    report = select_weights(teacher, student, layers=layers)
    assert report.layer_map == {"0": [0], "1": stage_one}
    first, second = report.index_sets[16, 8], report.index_sets[32, 16]
    t, s = teacher.state_dict(), student.state_dict()
    teacher_convs = {0: "features.4", 1: "features.7", 2: "features.10"}
    for student_conv, block in zip(("features.4", "features.7"), stage_one):
        inputs = first if student_conv == "features.4" else second
        source = teacher_convs[block]
        assert report.sources[f"{student_conv}.weight"] == f"{source}.weight"
        assert torch.equal(s[f"{student_conv}.weight"], t[f"{source}.weight"][second][:, inputs])
        norm, teacher_norm = student_conv[:-1] + str(int(student_conv[-1]) + 1), f"features.{int(source[9:]) + 1}"
        assert torch.equal(s[f"{norm}.running_mean"], t[f"{teacher_norm}.running_mean"][second])
    with pytest.raises(WeightSelectionError, match="start the list with 0"):
        select_weights(teacher, student, layers="0;1,2")


def test_a_registered_student_through_the_command_line_equals_the_python_result(tmp_path):
    import timm

    from hf_regtools import cli
    from hf_regtools.adapters import save_model

    torch.manual_seed(0)
    teacher = timm.create_model("vgg13_bn", pretrained=False, num_classes=3, mlp_ratio=1 / 256)
    student = timm.create_model("vgg11_bn", pretrained=False, num_classes=3, mlp_ratio=1 / 512)
    save_model(teacher, tmp_path / "teacher")
    save_model(student, tmp_path / "student-config")
    assert cli.main(["select", str(tmp_path / "teacher"), "--student", str(tmp_path / "student-config"),
                     "--layers", "last", "--output", str(tmp_path / "student")]) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True)
    expected = select_weights(teacher, student, layers="last")
    assert expected.layer_map == {"0": [0], "1": [0], "2": [0, 1], "3": [0, 1], "4": [0, 1]}
    t, s = teacher.state_dict(), loaded.state_dict()
    assert all(torch.equal(value, student.state_dict()[key]) for key, value in s.items() if key in expected.loaded)
    assert torch.equal(s["features.8.weight"], t["features.14.weight"])  # stage 2's first convolution, 256 wide
    assert torch.equal(s["pre_logits.fc1.weight"], t["pre_logits.fc1.weight"][expected.index_sets["fc1"]])


def test_bad_students_and_bare_classes_get_clear_errors():
    teacher = timm_vgg(widths=(16, 32, 32))
    with pytest.raises(WeightSelectionError, match=r"has 2 stages, the student 1"):
        select_weights(teacher, timm_vgg(widths=(8,)))
    with pytest.raises(WeightSelectionError, match="no teacher counterpart"):
        select_weights(timm_vgg(batch_norm=False), timm_vgg(widths=(8, 16, 16)))
    with pytest.raises(UnsupportedModelError, match="built from its class, not by timm.create_model"):
        initialize_student(teacher, timm_vgg(widths=(8, 16, 16)))
