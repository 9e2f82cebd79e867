"""`class_prototypes`: exact class means of the backbone's pooled features (timm and transformers, module and folder,
default preprocessing), streaming equal to map-style, two processes equal to one, the disk cache and the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_regtools.data_selection.prototypes import ClassPrototypes, class_prototypes, dataset_fingerprint

from .prototype_data import (SOURCE_NAMES, TARGET_NAMES, manual_prototypes, source_dataset, streaming,
                             target_dataset, timm_backbone, timm_pixels, transformers_backbone_folder)


def _assert_prototypes(result: ClassPrototypes, expected: dict[int, torch.Tensor], counts, atol=1e-5):
    assert result.labels == sorted(expected)
    assert result.counts == counts
    assert result.prototypes.dtype == torch.float32
    assert result.prototypes.shape == (len(expected), next(iter(expected.values())).numel())
    for row, label in enumerate(result.labels):
        torch.testing.assert_close(result.prototypes[row].double(), expected[label], atol=atol, rtol=1e-5)


def test_timm_module_with_its_own_preprocessing():
    data = target_dataset()
    model = timm_backbone()
    result = class_prototypes(model, data, progress=False, batch_size=4)
    expected = manual_prototypes(model, timm_pixels(model, data["image"]), data["label"])
    _assert_prototypes(result, expected, [6, 6, 6])
    assert result.names == TARGET_NAMES and result.feature_dim == 64
    assert not result.prototypes.requires_grad and not model.training


def test_transformers_folder_uses_its_image_processor(tmp_path):
    from transformers import ViTImageProcessor

    data = target_dataset()
    model = transformers_backbone_folder(tmp_path / "vit")
    result = class_prototypes(tmp_path / "vit", data, progress=False, batch_size=5)
    processor = ViTImageProcessor.from_pretrained(tmp_path / "vit")
    pixels = processor(images=[image.convert("RGB") for image in data["image"]], return_tensors="pt")["pixel_values"]
    _assert_prototypes(result, manual_prototypes(model, pixels, data["label"]), [6, 6, 6])
    assert result.feature_dim == 16  # the classifier's input: the ViT's final-norm CLS token


def test_preprocessed_pixels_user_transform_and_feature():
    import datasets

    torch.manual_seed(1)
    pixels = torch.randn(11, 3, 16, 16)
    labels = [3, 7, 3, 9, 7, 3, 9, 9, 7, 3, 9]  # plain integers: rows are the label values seen, sorted
    data = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels})
    model = timm_backbone()
    result = class_prototypes(model, data, progress=False, batch_size=3)
    _assert_prototypes(result, manual_prototypes(model, pixels, labels), [4, 3, 4])
    assert result.names is None

    projection = torch.nn.Linear(64, 5)
    halve = lambda image: image / 2  # noqa: E731
    projected = class_prototypes(model, data, progress=False, transform=halve,
                                 feature=lambda m, x: projection(m.forward_head(m.forward_features(x), pre_logits=True)))
    with torch.no_grad():
        features = projection(model.forward_head(model.forward_features(pixels / 2), pre_logits=True)).double()
    expected = {label: features[torch.tensor(labels) == label].mean(0) for label in (3, 7, 9)}
    _assert_prototypes(projected, expected, [4, 3, 4])


def test_streaming_equals_map_style(tmp_path):
    data = source_dataset()
    stream = streaming(data, tmp_path)
    model = timm_backbone()
    expected = class_prototypes(model, data, progress=False, batch_size=7)
    result = class_prototypes(model, stream, progress=False, batch_size=7)
    torch.testing.assert_close(result.prototypes, expected.prototypes, atol=1e-6, rtol=1e-6)
    assert (result.labels, result.counts, result.names) == (expected.labels, expected.counts, SOURCE_NAMES)


def test_source_is_streamed_not_loaded(tmp_path, monkeypatch):
    """The IterableDataset is read batch by batch: at most one batch (plus the DataLoader's prefetch) is alive."""
    import datasets

    data = source_dataset()
    stream = streaming(data, tmp_path)
    alive, peak = [0], [0]
    original = datasets.IterableDataset.__iter__

    def counting(self):
        for row in original(self):
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            yield row

    model = timm_backbone()
    forward = model.forward

    def consume(x):
        alive[0] -= x.shape[0]
        return forward(x)

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counting)
    monkeypatch.setattr(model, "forward", consume)
    class_prototypes(model, stream, progress=False, batch_size=4)
    assert alive[0] == 0 and peak[0] <= 4 < len(data)


def test_cache_hit_skips_the_model_and_misses_on_changes(tmp_path, monkeypatch):
    from hf_regtools import hub

    data = target_dataset()
    folder = tmp_path / "timm"
    from hf_regtools.adapters import save_model

    save_model(timm_backbone(), folder)
    first = class_prototypes(folder, data, progress=False, cache_dir=tmp_path / "cache")
    entries = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".safetensors")
    sidecar = json.loads((tmp_path / "cache" / entries[0]).read_text())
    assert sidecar["labels"] == [0, 1, 2] and sidecar["names"] == TARGET_NAMES and sidecar["counts"] == [6, 6, 6]

    calls = []
    load_model = hub.load_model
    monkeypatch.setattr(hub, "load_model", lambda *a, **k: calls.append(a) or load_model(*a, **k))
    again = class_prototypes(folder, data, progress=False, cache_dir=tmp_path / "cache")
    assert calls == [] and torch.equal(again.prototypes, first.prototypes) and again.names == first.names

    flipped = class_prototypes(folder, data, progress=False, cache_dir=tmp_path / "cache",
                               transform=lambda image: timm_pixels(timm_backbone(), [image])[0].flip(-1))
    assert len(calls) == 1 and not torch.allclose(flipped.prototypes, first.prototypes)
    save_model(timm_backbone(seed=1), folder)  # other weights in the same folder
    class_prototypes(folder, data, progress=False, cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_cache_of_a_module_and_of_a_stream(tmp_path):
    import datasets

    data = source_dataset()
    stream = streaming(data, tmp_path)
    model = timm_backbone()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    first = class_prototypes(model, stream, progress=False, cache_dir=tmp_path / "cache")
    count = len(calls)
    reopened = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "data.parquet")}, split="train",
                                     streaming=True)
    assert dataset_fingerprint(reopened) == dataset_fingerprint(stream)
    again = class_prototypes(model, reopened, progress=False, cache_dir=tmp_path / "cache")
    assert count and len(calls) == count and torch.equal(again.prototypes, first.prototypes)
    with torch.no_grad():
        model.conv1.weight.mul_(2)  # other weights, same module
    before = dataset_fingerprint(stream)
    class_prototypes(model, stream, progress=False, cache_dir=tmp_path / "cache")
    assert len(calls) > count
    rewritten = streaming(data.select(range(10)), tmp_path)  # the data file changed
    assert dataset_fingerprint(rewritten) != before


def test_fingerprints():
    data = target_dataset()
    assert dataset_fingerprint(data) == data._fingerprint
    assert dataset_fingerprint(data.select(range(3))) != data._fingerprint
    assert dataset_fingerprint([1, 2]) is None


def test_errors():
    import datasets

    data = target_dataset()
    model = timm_backbone()
    with pytest.raises(ValueError, match=r"no label column 'fine'; its columns are image, label, note"):
        class_prototypes(model, data, "fine", progress=False)
    missing = data.cast_column("label", datasets.ClassLabel(names=[*TARGET_NAMES, "three"]))
    with pytest.raises(ValueError, match=r"class 'three' of its ClassLabel has no examples"):
        class_prototypes(model, missing, progress=False)
    assert class_prototypes(model, missing, progress=False, skip_empty_classes=True).labels == [0, 1, 2]
    strings = data.cast_column("label", datasets.Value("string"))
    with pytest.raises(ValueError, match="class labels must be integers or a ClassLabel"):
        class_prototypes(model, strings, progress=False)
    unlabelled = datasets.Dataset.from_dict({"pixel_values": torch.randn(2, 3, 16, 16).numpy(), "label": [0, -1]})
    with pytest.raises(ValueError, match="unlabelled examples"):
        class_prototypes(model, unlabelled, progress=False)
    with pytest.raises(ValueError, match="gives no features"):
        class_prototypes(model, data, progress=False, feature=lambda m, x: m(x).sum())
    with pytest.raises(ValueError, match="has no default preprocessing"):
        class_prototypes(torch.nn.Conv2d(3, 4, 3), data, progress=False)


DISTRIBUTED = Path(__file__).with_name("distributed_prototypes.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    data = source_dataset()
    data.save_to_disk(str(tmp_path / "data"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(DISTRIBUTED), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = timm_backbone()
    single = {"map": class_prototypes(model, data, progress=False, batch_size=4),
              "stream": class_prototypes(model, streaming(data, tmp_path), progress=False, batch_size=4)}
    for kind, expected in single.items():
        for rank in (0, 1):
            result = ClassPrototypes.load(tmp_path / f"{kind}-{rank}.safetensors")
            assert (result.labels, result.counts, result.names) == (expected.labels, expected.counts, expected.names)
            torch.testing.assert_close(result.prototypes, expected.prototypes, atol=1e-5, rtol=0)
        first = ClassPrototypes.load(tmp_path / f"{kind}-0.safetensors").prototypes
        assert torch.equal(first, ClassPrototypes.load(tmp_path / f"{kind}-1.safetensors").prototypes)
