import pytest
import torch
from safetensors.torch import load_file, save_file


from hf_regtools.checkpoint import CheckpointError, CheckpointReader


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(64, 64) for i in range(6)}


def test_safetensors_reader_reads_lazily(tmp_path, tensors):
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    assert set(reader) == set(tensors) and len(reader) == 6
    assert reader.shape("layer.3.weight") == (64, 64)
    copy = reader["layer.0.weight"]
    copy.zero_()
    assert torch.equal(reader["layer.0.weight"], tensors["layer.0.weight"])
    with reader.borrowed("layer.1.weight") as view:
        assert torch.equal(view, tensors["layer.1.weight"])
    with reader:
        assert torch.equal(reader["layer.2.weight"], tensors["layer.2.weight"])


def resident_bytes():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


def test_borrowed_tensors_do_not_stay_resident(tmp_path):
    big = {f"block.{i}.weight": torch.randn(2048, 1024) for i in range(8)}  # 8 x 8 MiB
    save_file(big, tmp_path / "model.safetensors")
    del big

    def grown_by(teacher, read):
        before = resident_bytes()
        for key in list(teacher):
            read(teacher, key)
        return (resident_bytes() - before) / 2**20

    def through_borrow(teacher, key):
        with teacher.borrowed(key) as view:
            view.index_select(0, torch.arange(0, 2048, 4))

    unreleased = grown_by(load_file(tmp_path / "model.safetensors"), lambda t, k: t[k].index_select(0, torch.arange(0, 2048, 4)))
    released = grown_by(CheckpointReader(tmp_path), through_borrow)
    assert unreleased > 48 and released < 16, (unreleased, released)


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
