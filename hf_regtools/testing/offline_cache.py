"""Hand-fill a Hugging Face cache so that `HF_HUB_OFFLINE=1` loads resolve without any network.

Layout (`huggingface_hub`'s): `models--{org}--{name}/refs/{revision}` holds a commit sha and
`models--{org}--{name}/snapshots/{sha}/` the files (plain copies are accepted in place of blob symlinks).
`hub_offline()` switches offline mode on inside a running process (the variable itself is read at import).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_to_cache(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, *,
                 revision: str = "main", sha: str | None = None) -> str:
    """Copy the files of `folder` into `cache_dir` as snapshot `sha` of model repo `repo_id`; returns the sha.

    Args:
        cache_dir (`str` or `os.PathLike`): the `HF_HUB_CACHE` folder.
        repo_id (`str`): `org/name`.
        folder (`str` or `os.PathLike`): the model files (e.g. written by `save_pretrained` or timm `save_for_hf`).
        revision (`str`, *optional*, defaults to `"main"`): the ref to point at the snapshot.
        sha (`str`, *optional*): 40-hex commit sha; derived from the file contents by default.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if sha is None:
        digest = hashlib.sha1()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
        sha = digest.hexdigest()
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    for path in files:
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(sha)
    return sha


@contextmanager
def hub_offline() -> Iterator[None]:
    """Within the block, huggingface_hub and transformers in this process behave as under `HF_HUB_OFFLINE=1`.

    For tests that set the environment too late: `huggingface_hub` and transformers read `HF_HUB_OFFLINE` at import,
    and some versions cache it (`hf_regtools._compat.set_hub_offline`).
    """
    import huggingface_hub

    from .._compat import set_hub_offline

    previous = huggingface_hub.constants.HF_HUB_OFFLINE
    set_hub_offline(True)
    try:
        yield
    finally:
        set_hub_offline(previous)
