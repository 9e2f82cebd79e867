"""The selection report (JSON round trip, PNG) and the selected subset of map-style and streamed source datasets."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_regtools.data_selection.report import DataSelectionReport, class_label_names, select_pretraining_subset

NAMES = [f"class_{i}" for i in range(6)]


def source_dataset(rows=60, with_images=False):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, rows)
    labels[:6] = np.arange(6)
    data = {"label": labels.tolist(), "index": list(range(rows))}
    features = {"label": datasets.ClassLabel(names=NAMES), "index": datasets.Value("int64")}
    if with_images:
        data["image"] = [Image.fromarray(np.full((4, 4, 3), i % 256, dtype=np.uint8)) for i in range(rows)]
        features["image"] = datasets.Image()
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def report(**overrides):
    values = dict(source="org/source", target="org/target", backbone="timm/resnet18.a1_in1k", label_column="label",
                  class_ids=[4, 1, 3], class_names=["class_4", "class_1", "class_3"], weights=[0.9, np.float32(0.5),
                                                                                              0.25],
                  target_marginal_error=np.float64(0.004), num_examples=27,
                  settings={"p_m": 0.1, "reg": 1.0, "reg_m": (1.0, 100.0), "n_classes": np.int64(3)})
    values.update(overrides)
    return DataSelectionReport(**values)


def test_report_json_round_trip(tmp_path):
    original = report()
    path = original.save_json(tmp_path / "report.json")
    assert json.loads(path.read_text())["settings"] == {"p_m": 0.1, "reg": 1.0, "reg_m": [1.0, 100.0], "n_classes": 3}
    loaded = DataSelectionReport.from_json(path)
    assert loaded == original
    assert loaded.to_dict() == original.to_dict() == json.loads(path.read_text())
    assert loaded.weights == [0.9, float(np.float32(0.5)), 0.25] and isinstance(loaded.num_examples, int)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    unnamed = report(class_names=None)
    assert DataSelectionReport.from_json(unnamed.save_json(tmp_path / "unnamed.json")).class_names is None


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="3 class_ids but 2 weights"):
        report(weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="3 class_ids but 1 class_names"):
        report(class_names=["a"])
    with pytest.raises(ValueError, match="label values are integers"):
        report(class_ids=[1.5, 2, 3])
    with pytest.raises(TypeError, match="not a JSON value"):
        report(settings={"model": object()})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"source": "x", "extra": 1}))
    with pytest.raises(ValueError, match=r"not a selection report: missing keys \['backbone'.*unknown keys \['extra'"):
        DataSelectionReport.from_json(bad)


def test_plot_writes_a_png(tmp_path):
    many = report(class_ids=list(range(30)), class_names=None, weights=np.linspace(1, 0.1, 30).tolist())
    for item, top in ((report(), 20), (many, 10)):
        path = item.plot(tmp_path / f"top{top}.png", top=top)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    with pytest.raises(ValueError, match="top must be a positive integer"):
        report().plot(tmp_path / "x.png", top=0)


def expected_indices(dataset, class_ids):
    return [i for i, label in enumerate(dataset["label"]) if label in class_ids]


def test_subset_of_a_map_style_dataset():
    dataset = source_dataset(with_images=True)
    subset = select_pretraining_subset(dataset, [4, 1])
    assert isinstance(subset, datasets.Dataset)
    assert list(subset["index"]) == expected_indices(dataset, {1, 4})
    assert subset.features == dataset.features
    assert np.array_equal(np.asarray(subset[0]["image"]), np.asarray(dataset[subset[0]["index"]]["image"]))
    assert class_label_names(subset, "label", [4, 1]) == ["class_4", "class_1"]
    assert class_label_names(dataset.cast_column("label", datasets.Value("int64")), "label", [4]) is None
    shuffled = select_pretraining_subset(dataset, [4, 1], seed=3)
    assert sorted(shuffled["index"]) == list(subset["index"]) and list(shuffled["index"]) != list(subset["index"])
    assert list(select_pretraining_subset(dataset, [1, 4], seed=3)["index"]) == list(shuffled["index"])


def test_subset_of_a_streamed_dataset():
    dataset = source_dataset(with_images=True)
    stream = dataset.to_iterable_dataset(num_shards=3)
    subset = select_pretraining_subset(stream, [0, 5, 2], seed=None)
    assert isinstance(subset, datasets.Dataset)
    assert sorted(subset["index"]) == expected_indices(dataset, {0, 2, 5})
    assert subset.features == dataset.features
    row = subset[0]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(dataset[row["index"]]["image"]))
    assert class_label_names(stream, "label", [5, 0]) == ["class_5", "class_0"]
    shuffled = select_pretraining_subset(stream, [0, 5, 2], seed=0)
    assert sorted(shuffled["index"]) == sorted(subset["index"])


def test_subset_errors():
    dataset = source_dataset()
    with pytest.raises(ValueError, match=r"no label column 'fine_label' \(columns: \['label', 'index'\]\)"):
        select_pretraining_subset(dataset, [1], label_column="fine_label")
    with pytest.raises(ValueError, match="class_ids is empty"):
        select_pretraining_subset(dataset, [])
    with pytest.raises(ValueError, match=r"class_ids \[6\] are outside the 6 classes"):
        select_pretraining_subset(dataset, [1, 6])
    with pytest.raises(TypeError, match="pass one split"):
        select_pretraining_subset(datasets.DatasetDict(train=dataset), [1])
    plain = dataset.cast_column("label", datasets.Value("int64")).filter(lambda row: row["label"] != 3)
    with pytest.raises(ValueError, match=r"selected classes \[3, 9\] have no example"):
        select_pretraining_subset(plain, [1, 3, 9])
    with pytest.raises(ValueError, match=r"selected classes \[3\] have no example"):
        select_pretraining_subset(plain.to_iterable_dataset(), [1, 3])
    with pytest.raises(ValueError, match="have no example"):
        select_pretraining_subset(plain.to_iterable_dataset(), [3])


def test_stream_of_unknown_columns_without_the_label_column():
    stream = datasets.IterableDataset.from_generator(lambda: iter([{"y": 1, "x": 0.5}]))
    with pytest.raises(ValueError, match=r"the source stream has no label column 'label' \(columns: \['x', 'y'\]\)"):
        select_pretraining_subset(stream, [1])
    assert list(select_pretraining_subset(stream, [1], label_column="y")["x"]) == [0.5]
