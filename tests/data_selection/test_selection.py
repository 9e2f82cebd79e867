"""`select_pretraining_data` end to end: a map-style target and a map-style or streaming source, the selection equal
to `uot_select_classes` on the prototypes, the subset holding every example of the selected labels, the report, the
cache hit of a second run, and the errors raised before any feature is computed."""

import pytest
import torch

from hf_regtools.data_selection.prototypes import class_prototypes
from hf_regtools.data_selection.selection import select_pretraining_data
from hf_regtools.data_selection.uot import uot_select_classes

from .prototype_data import SOURCE_NAMES, source_dataset, streaming, target_dataset, timm_backbone


@pytest.mark.parametrize("stream", [False, True], ids=["map-style", "streaming"])
def test_end_to_end(tmp_path, stream):
    target, source = target_dataset(), source_dataset()
    model = timm_backbone()
    result = select_pretraining_data(target, streaming(source, tmp_path) if stream else source, model, 3,
                                     progress=False, target_name="digits-012", source_name="digits-0-5")
    expected_source = class_prototypes(model, source, progress=False)
    expected_target = class_prototypes(model, target, progress=False)
    torch.testing.assert_close(result.source_prototypes.prototypes, expected_source.prototypes, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.target_prototypes.prototypes, expected_target.prototypes, atol=1e-6, rtol=1e-6)
    uot = uot_select_classes(expected_source.prototypes, expected_target.prototypes, 3)
    report = result.report
    assert report.class_ids == [expected_source.labels[row] for row in uot.class_ids]
    assert report.class_names == [SOURCE_NAMES[label] for label in report.class_ids]
    assert report.weights == pytest.approx([float(uot.importance[row]) for row in uot.class_ids], rel=1e-5)
    assert report.weights == sorted(report.weights, reverse=True)
    assert report.target_marginal_error == pytest.approx(uot.target_marginal_error, abs=1e-6)
    assert (report.source, report.target, report.label_column) == ("digits-0-5", "digits-012", "label")
    assert report.settings["p_m"] == 0.1 and report.settings["reg_m"] == [1.0, 100.0]
    assert report.settings["feature_dim"] == 64
    kept = [label for label in source["label"] if label in report.class_ids]
    assert sorted(result.dataset["label"]) == sorted(kept) and report.num_examples == len(kept) == 15
    assert result.dataset.features["label"].names == SOURCE_NAMES


def test_second_run_hits_the_cache_without_loading_the_backbone(tmp_path, monkeypatch):
    from hf_regtools import hub
    from hf_regtools.adapters import save_model

    save_model(timm_backbone(), tmp_path / "timm")
    target, source = target_dataset(), source_dataset()
    first = select_pretraining_data(target, source, tmp_path / "timm", 2, progress=False, cache_dir=tmp_path / "c",
                                    seed=0)
    monkeypatch.setattr(hub, "load_model", lambda *args, **kwargs: pytest.fail("the backbone was loaded"))
    again = select_pretraining_data(target, source, tmp_path / "timm", 2, progress=False, cache_dir=tmp_path / "c",
                                    seed=0)
    assert again.report.to_dict() == first.report.to_dict()
    assert again.dataset["label"] == first.dataset["label"]
    assert first.report.backbone == str(tmp_path / "timm")


def test_errors_before_the_work(tmp_path):
    import datasets

    target, source = target_dataset(), source_dataset()
    model = timm_backbone()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="larger than the 6 classes of the source"):
        select_pretraining_data(target, source, model, 7, progress=False)
    with pytest.raises(ValueError, match="source source has no label column 'fine'; its columns are image, label"):
        select_pretraining_data(target, source, model, 2, source_label_column="fine", progress=False)
    empty = target.cast_column("label", datasets.ClassLabel(names=["zero", "one", "two", "three"]))
    with pytest.raises(ValueError, match="class 'three' of its ClassLabel has no examples"):
        select_pretraining_data(empty, source, model, 2, progress=False)
    assert calls == []
    wide = timm_backbone(num_classes=0, global_pool="")  # flattened 4-D features: the width follows the input size
    small = datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 3, 16, 16).numpy(), "label": [0, 1] * 2})
    large = datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 3, 64, 64).numpy(), "label": [0, 1] * 2})
    with pytest.raises(ValueError, match=r"gives 64-d features on the target .* and 256-d on the source"):
        select_pretraining_data(small, large, wide, 2, progress=False)
