"""Weight selection for timm and transformers ResNets: basic and bottleneck blocks, with and without a downsampling
shortcut after the stem, BatchNorm running statistics, layer options, CLI round trips, errors."""

import json

import pytest
import torch

from hf_regtools.adapters import UnsupportedModelError, detect_family
from hf_regtools.cli import main as cli
from hf_regtools.dropout_schedules import DropRateController
from hf_regtools.testing.tiny_models import timm_resnet_model, transformers_resnet
from hf_regtools.weight_selection import WeightSelectionError, initialize_student, select_weights, uniform_indices

# name -> (teacher builder, student hidden_size, whether the first stage has a downsampling shortcut)
TEACHERS = {
    "timm basic, 7x7 stem, shortcut": (lambda: timm_resnet_model("resnet18"), 4, True),
    "timm basic, deep stem, identity": (lambda: timm_resnet_model("resnet18d", stem_width=4), 4, False),
    "timm bottleneck, 7x7 stem, shortcut": (lambda: timm_resnet_model("resnet50", channels=(2, 4, 8, 16)), 4, True),
    "timm bottleneck, deep stem, identity": (
        lambda: timm_resnet_model("resnet50d", channels=(2, 4, 8, 16), stem_width=4), 4, False),
    "timm bottleneck, tiered stem, shortcut": (
        lambda: timm_resnet_model("resnet26t", channels=(4, 8, 16, 32), stem_width=16), 8, True),
    "transformers basic, identity": (lambda: transformers_resnet(depths=(2, 2, 2, 2)), 4, False),
    "transformers basic, shortcut": (lambda: transformers_resnet(depths=(2, 2, 2, 2), embedding_size=16), 4, True),
    "transformers bottleneck, identity": (
        lambda: transformers_resnet(depths=(2, 2, 2, 2), layer_type="bottleneck"), 4, False),
    "transformers bottleneck, shortcut": (
        lambda: transformers_resnet(hidden_sizes=(16, 32, 32, 64), depths=(2, 2, 2, 2), layer_type="bottleneck"),
        8, True),
}


def _randomized(model):
    """`model` with BatchNorm statistics and affine parameters that are not their initial values."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)
    return model.eval()


def _stem(model):
    """The stem's first convolution, BatchNorm and activation."""
    if hasattr(model, "resnet"):
        return model.resnet.embedder.embedder
    first = model.conv1
    return torch.nn.Sequential(*first[:3]) if isinstance(first, torch.nn.Sequential) else torch.nn.Sequential(
        first, model.bn1, model.act1)


def _has_shortcut(model) -> bool:
    """Whether the first block has a downsampling shortcut (timm: `downsample` is `None` without; transformers:
    `shortcut` is `Identity`)."""
    found = (model.resnet.encoder.stages[0].layers[0].shortcut if hasattr(model, "resnet")
             else model.layer1[0].downsample)
    return found is not None and not isinstance(found, torch.nn.Identity)


@pytest.mark.parametrize("name", TEACHERS)
def test_stem_output_is_the_teachers_on_the_selected_channels(name):
    build, width, shortcut = TEACHERS[name]
    torch.manual_seed(0)
    teacher = _randomized(build())
    result = initialize_student(teacher, hidden_size=width, depth=(1, 2, 1, 1), num_labels=5)
    student, report = result.model.eval(), result.report
    assert detect_family(student).label == detect_family(teacher).label
    assert _has_shortcut(teacher) == _has_shortcut(student) == shortcut
    first_conv = next(m for m in _stem(teacher).modules() if isinstance(m, torch.nn.Conv2d))
    student_width = next(m for m in _stem(student).modules() if isinstance(m, torch.nn.Conv2d)).out_channels
    index = uniform_indices(first_conv.out_channels, student_width)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_stem(student)(images), _stem(teacher)(images)[:, index])
        logits = student(images) if not hasattr(student, "resnet") else student(pixel_values=images).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert ("c1" in report.index_sets) == shortcut
    block = "layer1.0.conv2.weight" if "timm basic" in name else None
    if block:  # a basic block's output is the stage's channels, the stem's without a shortcut
        assert report.axes[block][0] == ("c1" if shortcut else "c0")
    tracked = [key for key in report.loaded if key.endswith("num_batches_tracked")]
    assert tracked and all(int(student.state_dict()[key]) == 7 for key in tracked)


def test_batchnorm_statistics_follow_their_channels_and_shortcuts_map_stage_to_stage():
    torch.manual_seed(0)
    teacher = _randomized(timm_resnet_model("resnet50d", channels=(4, 8, 16, 32), stem_width=8))
    student = timm_resnet_model("resnet50d", channels=(2, 4, 8, 16), layers=(1, 1, 1, 1), stem_width=4)
    report = select_weights(teacher, student)
    c1, c2 = uniform_indices(16, 8), uniform_indices(32, 16)
    mid = report.index_sets["mid2.0"]
    t, s = teacher.layer2[0], student.layer2[0]
    assert torch.equal(s.downsample[1].weight, t.downsample[1].weight[c2][:, c1])  # avg_down: conv at .1, BN at .2
    for buffer in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(s.downsample[2], buffer), getattr(t.downsample[2], buffer)[c2])
        assert torch.equal(getattr(s.bn2, buffer), getattr(t.bn2, buffer)[mid])
    assert torch.equal(s.conv1.weight, t.conv1.weight[mid][:, c1])
    assert torch.equal(s.conv3.weight, t.conv3.weight[c2][:, mid])
    assert "fc.weight" in report.skipped


@pytest.mark.parametrize("layers, expected", [("first", [0, 1]), ("last", [0, 3]), ("even", [0, 2]),
                                              ([[0, 3]] * 4, [0, 3])])
def test_layer_options_keep_each_stages_first_block(layers, expected):
    teacher = transformers_resnet(depths=(4, 4, 4, 4))
    student = transformers_resnet(hidden_sizes=(4, 8, 16, 32), embedding_size=4, depths=(2, 2, 2, 2))
    report = select_weights(teacher, student, layers=layers)
    assert report.layer_map == {str(stage): expected for stage in range(4)}
    key = "resnet.encoder.stages.1.layers.1.layer.0.convolution.weight"
    assert report.sources[key] == key.replace("layers.1", f"layers.{expected[1]}")
    with pytest.raises(WeightSelectionError, match="student block 0 must read teacher block 0"):
        select_weights(teacher, student, layers=[[1, 2]] * 4)


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_cli_round_trip(tmp_path, library):
    torch.manual_seed(0)
    if library == "timm":
        teacher = timm_resnet_model("resnet50")
    else:
        teacher = transformers_resnet(depths=(2, 2, 2, 2), layer_type="bottleneck")
    teacher.eval()
    from hf_regtools.adapters import save_model

    save_model(teacher, tmp_path / "teacher")
    code = cli(["select", str(tmp_path / "teacher"), "--hidden-size", "16,32,64,128" if library == "timm" else "4",
                "--depth", "1,1,2,1", "--num-labels", "5", "--layers", "last", "--output", str(tmp_path / "student")])
    assert code == 0
    images = torch.randn(2, 3, 32, 32)
    if library == "timm":
        import timm

        student = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
        config = json.loads((tmp_path / "student" / "config.json").read_text())
        assert config["architecture"] == "resnet50" and config["model_args"]["channels"] == [4, 8, 16, 32]
        assert [len(getattr(student, f"layer{i}")) for i in range(1, 5)] == [1, 1, 2, 1]
        logits = student(images)
        mid = uniform_indices(32, 16)
        assert torch.equal(student.layer3[1].conv2.weight, teacher.layer3[1].conv2.weight[mid][:, mid])
    else:
        from transformers import AutoModelForImageClassification

        student = AutoModelForImageClassification.from_pretrained(tmp_path / "student").eval()
        assert student.config.hidden_sizes == [4, 8, 16, 32] and student.config.embedding_size == 4
        logits = student(pixel_values=images).logits
    assert logits.shape == (2, 5)
    assert "weight selection" in (tmp_path / "student" / "README.md").read_text().lower()


@pytest.mark.parametrize("build, overrides, message", [
    (lambda: timm_resnet_model("resnet18"), dict(hidden_size=16), "stage 1 width 16 \\(the teacher's 8\\)"),
    (lambda: timm_resnet_model("resnet18", channels=(64, 64, 64, 64), layers=(1, 1, 1, 1)),
     dict(hidden_size=(32, 32, 32, 32)),
     "7x7 stem is always 64 channels wide; the teacher's first stage \\(64 channels\\) has no downsampling "
     "shortcut, so the student's must keep 64 channels"),
    (lambda: timm_resnet_model("resnet26t", channels=(2, 4, 8, 16), stem_width=4), dict(hidden_size=4),
     "a tiered deep stem needs stem_width >= 4"),
    (lambda: timm_resnet_model("resnet18d", stem_width=4), dict(hidden_size=(3, 8, 16, 32)), "an even width"),
    (lambda: timm_resnet_model("resnet50", channels=(2, 4, 8, 16)), dict(hidden_size=(4, 8, 16, 30)),
     "multiples of its expansion, 4"),
    (lambda: transformers_resnet(), dict(depth=(1, 2, 1, 1)), "stage 2 depth 2 \\(the teacher's 1\\)"),
    (lambda: transformers_resnet(), dict(depth=3), "one count per stage"),
    (lambda: transformers_resnet(), dict(num_heads=2), "do not apply to a CNN"),
    (lambda: transformers_resnet(embedding_size=9), dict(hidden_size=4),
     "stem \\(9 channels\\) and first stage \\(8\\) differ, so the student's must too"),
])
def test_bad_students_are_refused_before_any_weight_is_read(build, overrides, message):
    with pytest.raises(ValueError, match=message):
        initialize_student(build(), **overrides)


def test_a_student_without_the_teachers_shortcut_is_refused():
    teacher = transformers_resnet(embedding_size=16)
    student = transformers_resnet(hidden_sizes=(4, 8, 16, 32), embedding_size=4)
    with pytest.raises(WeightSelectionError, match="c1 has its own channels \\(a projection\\); in the student c1 is "
                                                   "c0 \\(identity residual"):
        select_weights(teacher, student)


def test_other_techniques_keep_refusing_resnets():
    with pytest.raises(UnsupportedModelError, match="dropout schedules does not support the model's family, timm "
                                                    "resnet: timm ResNets build no stochastic-depth module"):
        DropRateController(timm_resnet_model(drop_path_rate=0.1), target="drop_path")


def test_stages_without_a_projection_chain_onto_the_axis_before_them():
    from hf_regtools.adapters.families.resnet import TIMM_RESNET, TRANSFORMERS_RESNET

    keys = ["layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight", "layer3.0.downsample.0.weight"]
    assert TIMM_RESNET.axis_aliases(keys) == {"c1": "c0", "c2": "c0"}
    assert TIMM_RESNET.axis_names("layer2.0.conv2.weight", 4, aliases={"c2": "c0"}) == ("c0", "mid2.0", None, None)
    keys = ["resnet.encoder.stages.0.layers.0.layer.0.convolution.weight",
            "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight"]
    assert TRANSFORMERS_RESNET.axis_aliases(keys) == {}
    assert TRANSFORMERS_RESNET.axis_names("classifier.1.weight", 2, last_stage=3) == (None, "c4")
