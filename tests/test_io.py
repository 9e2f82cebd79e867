"""Output folders (`hf_regtools._io`): complete or absent, filled in place, cleaned up on every error."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hf_regtools import _io
from hf_regtools._io import OutputError, atomic_directory, check_output_dir, remove_stale_staging


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def unrenamable(monkeypatch):
    """Make renaming the given folder itself fail with EBUSY, as for a mount point (a Docker volume, a drive)."""
    busy = set()
    real_replace, real_rename = os.replace, os.rename

    def guarded(real):
        def move(source, destination, *args, **kwargs):
            if os.path.abspath(source) in busy or os.path.abspath(destination) in busy:
                raise OSError(errno.EBUSY, "Device or resource busy", str(source))
            return real(source, destination, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", guarded(real_replace))
    monkeypatch.setattr(os, "rename", guarded(real_rename))
    return lambda folder: busy.add(os.path.abspath(folder))


def test_existing_empty_folder_is_filled_in_place(tmp_path, unrenamable):
    target = tmp_path / "volume"
    target.mkdir()
    unrenamable(target)
    inode = target.stat().st_ino
    with atomic_directory(target) as staging:
        write(staging, {"model.safetensors": b"weights", "config.json": b"{}"})
    assert contents(target) == {"model.safetensors": b"weights", "config.json": b"{}"}
    assert target.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["volume"]

    with atomic_directory(target, overwrite=True) as staging:
        write(staging, {"model.safetensors": b"new weights"})
    assert contents(target) == {"model.safetensors": b"new weights"} and target.stat().st_ino == inode


def test_current_folder_as_output(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", os.getcwd()):
        with atomic_directory(target, overwrite=True) as staging:
            write(staging, {"README.md": target.encode()})
        assert os.getcwd() == str(work) and Path(".").resolve() == work and work.exists()
        assert contents(work) == {"README.md": target.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_failures_leave_old_content_and_no_staging(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    write(target, {"old.bin": b"old", "README.md": b"old card"})
    for interrupt in (KeyboardInterrupt, OSError):
        with pytest.raises(interrupt):
            with atomic_directory(target, overwrite=True) as staging:
                write(staging, {"model.safetensors": b"partial"})
                raise interrupt()
        assert contents(target) == {"old.bin": b"old", "README.md": b"old card"}

    real_replace = os.replace

    def fail_on_second_new_entry(source, destination):
        if Path(source).name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", fail_on_second_new_entry)
    with pytest.raises(OutputError, match=r"cannot move model.safetensors into the output .*No space left on device"):
        with atomic_directory(target, overwrite=True) as staging:
            write(staging, {"README.md": b"new card", "model.safetensors": b"new"})
    monkeypatch.undo()
    assert contents(target) == {"old.bin": b"old", "README.md": b"old card"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with atomic_directory(new) as staging:
            write(staging, {"model.safetensors": b"partial"})
            raise RuntimeError("selection failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_permissions_follow_the_umask(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    previous = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "a" / "out") as staging:
            save_file({"w": np.zeros(2, dtype=np.float32)}, str(staging / "model.safetensors"))
            (staging / "sub").mkdir(mode=0o700)
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    out = tmp_path / "a" / "out"
    assert (mode(tmp_path / "a"), mode(out), mode(out / "sub")) == (0o750, 0o750, 0o750)
    assert (mode(out / "model.safetensors"), mode(out / "config.json")) == (0o640, 0o640)


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "out"
    target.mkdir()
    stale = [tmp_path / f".out.partial-{dead_pid}-0a1b2c3d", target / f".out.partial-{dead_pid}-0badcafe",
             target / f".out.old-{dead_pid}-12345678"]
    alive = [tmp_path / f".out.partial-{os.getppid()}-0a1b2c3d", tmp_path / f".other.partial-{dead_pid}-0a1b2c3d"]
    for folder in stale + alive:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"whole weights")

    with atomic_directory(target) as staging:
        write(staging, {"config.json": b"{}"})
    assert contents(target) == {"config.json": b"{}"}
    assert not any(folder.exists() for folder in stale) and all(folder.exists() for folder in alive)
    assert remove_stale_staging(target) == []


def test_checks_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match=r"file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        check_output_dir(tmp_path / "full")
    assert check_output_dir(tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert check_output_dir(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert not (tmp_path / "new").exists()


def test_staging_name_carries_the_pid(tmp_path):
    seen = []
    with atomic_directory(tmp_path / "out") as staging:
        seen.append(staging)
        assert staging.parent == tmp_path and staging.name.startswith(f".out.partial-{os.getpid()}-")
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as staging:
        assert staging.parent == tmp_path / "empty"
    assert not seen[0].exists() and _io._process_alive(os.getpid())
