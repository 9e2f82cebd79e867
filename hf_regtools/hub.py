"""The Hub layer: resolve model references, pull them, push folders with a model card.

Everything goes through the real client paths (`huggingface_hub.snapshot_download`, `from_pretrained`,
`timm.create_model("hf-hub:...")`, `HfApi.upload_folder`), so it works online, from the HF cache, with
`HF_HUB_OFFLINE=1`, and against any endpoint selected with `HF_ENDPOINT`. Tokens come from the usual
environment / `hf auth login` and are never printed, logged or written to files.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ._compat import hub_client_errors

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PREPROCESSING_FILES: dict[str, tuple[str, ...]] = {
    "image processor": ("preprocessor_config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja"),
    "generation config": ("generation_config.json",),
}
"""Files that prepare a model's inputs, by kind: fetched with its config, copied to a student that keeps what they
depend on (tokenizer files belong here too, and a language model's generation settings: special token ids, sampling
defaults)."""
CONFIG_PATTERNS = ("config.json", "*.md", *(name for files in PREPROCESSING_FILES.values() for name in files))
LIBRARIES = ("timm", "transformers")


class HubError(RuntimeError):
    """A Hub operation failed; the message says what and how to fix it (never the token)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a local folder.

    Attributes:
        reference (`str`): what the user gave, e.g. `"hf-hub:timm/vit_small_patch16_224.augreg_in21k"`.
        folder (`Path`): local folder with `config.json` and the weights (a cache snapshot or the user's folder).
        library (`str`): `"timm"` or `"transformers"`.
        repo_id (`str`, *optional*): Hub repo id, `None` for a local folder.
        revision (`str`, *optional*): the commit sha the files come from, when pulled from the Hub.
    """

    reference: str
    folder: Path
    library: str
    repo_id: str | None = None
    revision: str | None = None

    @property
    def hub_reference(self) -> str:
        """How `base_model` cards and `from_pretrained` name it: the repo id, else the folder."""
        return self.repo_id or str(self.folder)

    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / "config.json").read_text())


def parse_reference(reference: str, revision: str | None = None) -> tuple[str, str | None, str | None]:
    """Split `"hf-hub:org/name@rev"` / `"org/name"` into `(repo_id, revision, library hint)`."""
    library = None
    if reference.startswith("hf-hub:"):
        reference, library = reference[len("hf-hub:"):], "timm"
    if "@" in reference:
        reference, _, at_revision = reference.partition("@")
        if revision and revision != at_revision:
            raise ValueError(f"two revisions given for {reference!r}: {at_revision!r} and {revision!r}")
        revision = at_revision
    return reference, revision, library


@contextmanager
def hub_errors(action: str, repo_id: str | None = None, *, write: bool = False):
    """Translate `huggingface_hub` errors (HTTP, offline mode, no connection, timeout) into `HubError`s that say what
    to do."""
    http, connection, timeout = hub_client_errors()
    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, LocalTokenNotFoundError, *http, *connection, *timeout) as error:
        what = f"{action} {repo_id!r}" if repo_id else action
        raise HubError(f"{what}: {_explain(error, write)}") from error


def _explain(error: Exception, write: bool) -> str:
    _, connection, timeout = hub_client_errors()
    if isinstance(error, LocalEntryNotFoundError):
        cause = error.__cause__ or error.__context__
        if isinstance(cause, HfHubHTTPError):
            return _explain(cause, write)
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return ("not in the local cache and HF_HUB_OFFLINE=1 is set. Download it once online, or pass a local "
                    "folder")
        return "not in the local cache and the Hub cannot be reached. Check the network, or pass a local folder"
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to reach the Hub"
    if isinstance(error, LocalTokenNotFoundError):
        access = "write access" if write else "access to this repo"
        return f"not logged in. Log in with `hf auth login` or set HF_TOKEN to a token with {access}"
    if isinstance(error, timeout):
        return (f"the Hub at {huggingface_hub.constants.ENDPOINT} did not answer in time ({_network_reason(error)}); "
                "check the network and try again")
    if isinstance(error, connection):
        return (f"cannot reach the Hub at {huggingface_hub.constants.ENDPOINT} ({_network_reason(error)}); check the "
                "network, a proxy or HF_ENDPOINT, and try again")
    if isinstance(error, GatedRepoError):
        return "the repo is gated; accept its terms on the Hub and log in (`hf auth login`)"
    if isinstance(error, RepositoryNotFoundError):
        return ("repository not found. Check the id, or log in (`hf auth login` or the HF_TOKEN environment "
                "variable) if it is private")
    if isinstance(error, RevisionNotFoundError):
        return "revision not found; check the branch, tag or commit"
    if isinstance(error, EntryNotFoundError):
        return f"a required file is missing from the repo ({_server_message(error)})"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        access = "write access to this namespace" if write else "access to this repo"
        return f"not authorized (HTTP {status}). Log in with `hf auth login` or set HF_TOKEN to a token with {access}"
    if status is not None and status >= 500:
        return f"the Hub answered with a server error (HTTP {status}); try again later"
    if status is None:
        return f"the request failed ({_network_reason(error)}); check the network and try again"
    return f"HTTP {status}: {_server_message(error)}"


def _network_reason(error: BaseException) -> str:
    """A short cause, e.g. `"Connection refused"`, instead of the client's nested retry messages."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^\"')(]+)", text)
    if found:
        return found[1].strip().rstrip(".:")
    first_line = text.splitlines()[0].strip() if text.strip() else ""
    return first_line[:200] or type(error).__name__


def _server_message(error: Exception) -> str:
    return getattr(error, "server_message", None) or str(error).splitlines()[0]


def resolve_model(reference: str | os.PathLike, *, revision: str | None = None, library: str | None = None,
                  weights: bool = True) -> ResolvedModel:
    """Resolve a local folder, a Hub repo id (`org/name`, `org/name@rev`) or a timm `hf-hub:` id to local files.

    Hub files are fetched with `snapshot_download` (the config, the card, the preprocessing files of
    `PREPROCESSING_FILES`, and safetensors weights, or `pytorch_model.bin` when a repo has no safetensors); with
    `HF_HUB_OFFLINE=1` they come from the cache. A reference that can only be a path (`./x`, `/x`, `~/x`, `x/`, more
    than one `/`) and does not exist is reported as a missing folder, without asking the Hub.

    Args:
        reference (`str` or `os.PathLike`): the model.
        revision (`str`, *optional*): branch, tag or commit on the Hub.
        library (`str`, *optional*): `"timm"` or `"transformers"`; detected from `config.json` by default.
        weights (`bool`, *optional*, defaults to `True`): also fetch the weights (else the config only; see
            `fetch_weights`).
    """
    if library is not None and library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; choose one of {LIBRARIES}")
    path = Path(reference).expanduser()
    if path.is_dir():
        return ResolvedModel(str(reference), path, _library_of(path, library, str(reference)))
    reference = str(reference)
    if path.exists():
        raise HubError(f"{reference!r} is a file; pass the folder holding config.json and the weights")
    repo_id, revision, hint = parse_reference(reference, revision)
    if hint is None and "/" not in repo_id:
        from .adapters.timm import hub_id_of

        timm_repo = hub_id_of(repo_id)
        if timm_repo:
            repo_id, hint = timm_repo, "timm"
    if hint is not None and not _is_repo_id(repo_id):
        raise HubError(f"{reference!r} does not name a Hub repo: expected 'hf-hub:org/name'")
    if not _is_repo_id(repo_id):
        suggestion = _nearby(path)
        hint_text = f" Did you mean {suggestion!r}?" if suggestion else ""
        raise HubError(f"no folder {reference!r} exists ({path.absolute()}).{hint_text} Pass an existing folder "
                       "holding config.json, or a Hub repo id of the form 'org/name'")
    try:
        with hub_errors("cannot fetch", repo_id):
            folder = _download(repo_id, revision, weights)
    except HubError as error:
        could_be_folder = hint is None
        if could_be_folder and isinstance(error.__cause__, (RepositoryNotFoundError, LocalEntryNotFoundError)):
            suggestion = _nearby(path)
            hint_text = f"; did you mean {suggestion!r}?" if suggestion else ""
            raise HubError(f"{reference!r} is neither a local folder (no {path.absolute()}{hint_text}) nor a Hub repo: "
                           f"{error}") from error.__cause__
        raise
    if not (folder / "config.json").is_file():
        raise HubError(f"{repo_id!r} has no config.json; it is not a timm or transformers model repo")
    return ResolvedModel(reference, folder, _library_of(folder, library or hint, reference), repo_id, folder.name)


def fetch_weights(resolved: ResolvedModel) -> ResolvedModel:
    """`resolved` with its weights fetched too, from the same commit (a local folder is returned as it is)."""
    if resolved.repo_id is None:
        return resolved
    with hub_errors("cannot fetch", resolved.repo_id):
        folder = _download(resolved.repo_id, resolved.revision, weights=True)
    return ResolvedModel(resolved.reference, folder, resolved.library, resolved.repo_id, folder.name)


def _download(repo_id: str, revision: str | None, weights: bool) -> Path:
    patterns = [*CONFIG_PATTERNS, *WEIGHT_PATTERNS] if weights else list(CONFIG_PATTERNS)
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    if weights and not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*patterns, "pytorch_model.bin"]))
    return folder


def _is_repo_id(reference: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if reference.count("/") != 1 or reference.startswith((".", "~")) or os.sep != "/" and os.sep in reference:
        return False
    try:
        validate_repo_id(reference)
    except HFValidationError:
        return False
    return True


def _nearby(path: Path) -> str | None:
    """A folder next to `path` with a similar name (`./teacher` for `./teachr`), if there is one."""
    import difflib

    parent = path.absolute().parent
    if not parent.is_dir() or not path.name:
        return None
    close = difflib.get_close_matches(path.name, [entry.name for entry in parent.iterdir() if entry.is_dir()], n=1)
    return str(path.parent / close[0]) if close else None


def _library_of(folder: Path, library: str | None, reference: str) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HubError(f"{reference!r} has no config.json; expected a timm or transformers model folder")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise HubError(f"{config_file} is not valid JSON ({error}); the download may be corrupt") from error
    from .adapters.timm import is_timm_config

    detected = "timm" if is_timm_config(config) else "transformers" if "model_type" in config else None
    if detected is None:
        raise HubError(f"{config_file} is neither a timm config (`architecture`) nor a transformers config "
                       "(`model_type`)")
    if library is not None and library != detected:
        raise HubError(f"{reference!r} is a {detected} model, not a {library} model")
    return detected


def load_model(reference: str | os.PathLike, *, revision: str | None = None, library: str | None = None, **kwargs):
    """Load a full pretrained model through `timm.create_model` or transformers `from_pretrained`."""
    resolved = resolve_model(reference, revision=revision, library=library, weights=False)
    with hub_errors("cannot load", resolved.repo_id):
        if resolved.library == "timm":
            import timm

            name = f"hf-hub:{resolved.repo_id}@{resolved.revision}" if resolved.repo_id else f"local-dir:{resolved.folder}"
            return timm.create_model(name, pretrained=True, **kwargs)
        from transformers import AutoConfig, AutoModel
        import transformers

        source = resolved.repo_id or str(resolved.folder)
        config = AutoConfig.from_pretrained(source, revision=resolved.revision)
        architecture = (config.architectures or ["AutoModel"])[0]
        model_class = getattr(transformers, architecture, AutoModel)
        return model_class.from_pretrained(source, revision=resolved.revision, **kwargs)


def model_card_template(name: str) -> Path:
    """Path of a template in `model_cards/` (shipped inside the package)."""
    template = files("hf_regtools").joinpath("model_cards", f"{name}.md")
    if not template.is_file():
        raise FileNotFoundError(f"no model card template {name!r} in hf_regtools/model_cards")
    return Path(str(template))


def build_model_card(template: str, *, card_data: dict[str, Any], **fields: Any) -> ModelCard:
    """Fill a `model_cards/` template with huggingface_hub's `ModelCard.from_template`.

    Args:
        template (`str`): template name, e.g. `"weight_selection"`.
        card_data (`dict`): YAML metadata (`base_model`, `library_name`, `tags`, ...).
        fields: values for the template's Jinja placeholders.
    """
    tags = list(dict.fromkeys(["hf-regtools", *card_data.pop("tags", [])]))
    data = ModelCardData(tags=tags, **card_data)
    return ModelCard.from_template(data, template_path=str(model_card_template(template)), **fields)


def push_target(repo_id: str, *, token: str | None = None) -> str:
    """Check, before any work, that `repo_id` can be pushed to; returns the namespaced id (`org/name`).

    Refuses offline mode, validates the id, and asks the Hub who the token belongs to (`HfApi.whoami`): this checks
    the token and the connection, and a bare `name` goes to the user's own namespace, as in `huggingface_hub`.

    Raises:
        `HubError`: offline mode, an invalid id, no or an invalid or read-only token, or the Hub cannot be reached.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to "
                       "push, or drop the push and upload the output later with `hf upload`")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise HubError(f"cannot push to {repo_id!r}: not a valid repo id ('org/name' or 'name'): {error}") from error
    api = HfApi(endpoint=huggingface_hub.constants.ENDPOINT, token=token)
    with hub_errors("cannot push to", repo_id, write=True):
        user = api.whoami()
    access = (user.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise HubError(f"cannot push to {repo_id!r}: the token is read-only. Log in with `hf auth login` or set "
                       "HF_TOKEN to a token with write access")
    return repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload with hf_regtools", revision: str | None = None,
                repo_type: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; returns the commit sha.

    `repo_type` is `huggingface_hub`'s: `None` (a model repo), `"dataset"` or `"space"`.

    A bare `name` goes to the token owner's namespace (see `push_target`). The token defaults to the usual HF
    environment / login; it is never printed or stored by us.

    Raises:
        `HubError`: the push failed (HTTP error, offline mode, no connection, timeout); the message says what to do.
    """
    if "/" not in repo_id:
        repo_id = push_target(repo_id, token=token)
    api = HfApi(endpoint=huggingface_hub.constants.ENDPOINT, token=token)
    with hub_errors("cannot push to", repo_id, write=True):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                   commit_message=commit_message, repo_type=repo_type)
    return commit.oid


@dataclass(frozen=True)
class TechniqueUse:
    """One hf_regtools technique used in a training run, with its settings (for model cards)."""

    name: str
    settings: dict[str, Any]


_SECTION_START, _SECTION_END = "<!-- hf_regtools:techniques:start -->", "<!-- hf_regtools:techniques:end -->"


def technique_tag(name: str) -> str:
    """The Hub tag of a technique, e.g. `alpha_svrg` -> `alpha-svrg`."""
    return name.replace("_", "-")


def add_techniques_to_card(card: ModelCard | str | os.PathLike, uses: list[TechniqueUse]) -> ModelCard:
    """Record the hf_regtools techniques of a run in a model card: tags and a section with settings and papers.

    `RegtoolsTrainerMixin.create_model_card` (and so `trainer.push_to_hub()`) calls it; in a custom loop, call it on
    the card you push. Given a path, the card is rewritten in place. Calling it again replaces the section.

    Args:
        card (`ModelCard` or path): the card, or the `README.md` to update.
        uses (`list[TechniqueUse]`): the techniques and their settings.

    Example:

    ```python
    from huggingface_hub import ModelCard
    from hf_regtools.hub import TechniqueUse, add_techniques_to_card

    card = add_techniques_to_card(ModelCard("---\\nlicense: mit\\n---\\n# My model\\n"),
                                  [TechniqueUse("dropout_schedules", {"callback": "EarlyDropoutCallback", "p": 0.1})])
    assert {"hf-regtools", "dropout-schedules"} <= set(card.data.tags)
    ```
    """
    from ._registry import get_technique

    path = None if isinstance(card, ModelCard) else Path(card)
    card = ModelCard.load(path) if path is not None else card
    tags = list(card.data.tags or [])
    for tag in ["hf-regtools", *(technique_tag(use.name) for use in uses)]:
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    lines = [_SECTION_START, "## Training techniques (hf_regtools)", ""]
    for use in uses:
        info = get_technique(use.name)
        reference = f"arXiv:{info.arxiv}" if info.arxiv else "paper"
        lines += [f"### {info.title}", "", f"{info.paper} ([{reference}]({info.url})).", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in use.settings.items()]
        lines.append("")
    lines.append(_SECTION_END)
    text = card.text
    if _SECTION_START in text:
        text = text[:text.index(_SECTION_START)] + text[text.index(_SECTION_END) + len(_SECTION_END):]
    card.text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    if path is not None:
        card.save(path)
    return card
