import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_regtools import checkpoint

from hf_regtools.checkpoint import CheckpointError, CheckpointReader


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(64, 64) for i in range(6)}


def test_safetensors_reader_reads_lazily_and_reopens_after_window(tmp_path, tensors, monkeypatch):
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path, window_bytes=2 * 64 * 64 * 4)
    assert set(reader) == set(tensors) and len(reader) == 6
    assert reader.shape("layer.3.weight") == (64, 64)
    opened = []
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: opened.append(a) or safe_open(*a, **k))
    for key in tensors:
        assert torch.equal(reader[key], tensors[key])
    assert len(opened) == 3  # two tensors per open file, then a fresh mapping
    with reader:
        reader["layer.0.weight"]
    assert reader._open is None


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_torch_bin_fallback(tmp_path, tensors, wrapper):
    torch.save(tensors if wrapper is None else {wrapper: tensors}, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader[k], v) for k, v in tensors.items())


def test_key_map_exposes_new_names(tmp_path, tensors):
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path).with_key_map({"new.weight": "layer.0.weight"})
    assert "new.weight" in reader and "layer.0.weight" not in reader and "layer.1.weight" in reader
    assert torch.equal(reader["new.weight"], tensors["layer.0.weight"])
    assert sorted(reader.stored_keys()) == sorted(tensors)


def test_errors(tmp_path, tensors):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "missing")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001.safetensors"}}')
    with pytest.raises(CheckpointError, match="names missing files"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        CheckpointReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        CheckpointReader(tmp_path / "pytorch_model.bin")
