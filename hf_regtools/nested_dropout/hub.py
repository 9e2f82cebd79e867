"""Save, load and push sub-networks of Bayesian nested networks, with a model card.

A sub-network has fewer channels than its architecture's config says, so it is saved as safetensors weights plus
`nested_subnet.json`, which records the shape of every cut or replaced layer; `load_subnet` rebuilds it from a
model of the base architecture (or, for transformers models, from the saved `config.json`). The folder is written
atomically (`hf_regtools._io.atomic_directory`), the card is filled by `hf_regtools.hub.build_model_card` from
`model_cards/nested_dropout_subnet.md`, and pushes go through `hf_regtools.hub.push_target` / `push_folder`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .extract import SUBNET_ATTRIBUTE, SampledConv2d, SampledLinear, SubnetInfo, _replace, _slice_norm, subnet_info

STRUCTURE_FILE = "nested_subnet.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_CONV_CLASSES = {"Conv2d": nn.Conv2d, "SampledConv2d": SampledConv2d}
_LINEAR_CLASSES = {"Linear": nn.Linear, "SampledLinear": SampledLinear}


def _structure(subnet: nn.Module) -> dict[str, dict[str, Any]]:
    """The constructor arguments of every convolution, linear and BatchNorm layer of `subnet`, by module name."""
    layers = {}
    for name, module in subnet.named_modules():
        if type(module).__name__ in _CONV_CLASSES and isinstance(module, nn.Conv2d):
            layers[name] = {"class": type(module).__name__, "in_channels": module.in_channels,
                            "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                            "stride": list(module.stride), "padding": module.padding if isinstance(
                                module.padding, str) else list(module.padding), "dilation": list(module.dilation),
                            "groups": module.groups, "bias": module.bias is not None,
                            "padding_mode": module.padding_mode}
        elif type(module).__name__ in _LINEAR_CLASSES and isinstance(module, nn.Linear):
            layers[name] = {"class": type(module).__name__, "in_features": module.in_features,
                            "out_features": module.out_features, "bias": module.bias is not None}
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            layers[name] = {"class": "norm", "num_features": module.num_features}
    return layers


def save_subnet(subnet: nn.Module, folder: str | os.PathLike, *, base_model: str | None = None,
                metrics: Mapping[str, Any] | None = None, overwrite: bool = False,
                repo_id: str | None = None) -> Path:
    """Save a sub-network from `extract_subnet`: weights, `nested_subnet.json` and a model card, atomically.

    The card (`README.md`) records the width `rho`, the kept channels of every nested convolution, the parameter
    count (and the full width's), the extraction settings, `metrics` and `base_model`; a Hub id as `base_model`
    goes into the card's metadata. A failure leaves no half-written folder (and an existing one unchanged).

    ```py
    from hf_regtools.nested_dropout import extract_subnet, load_subnet, save_subnet

    save_subnet(extract_subnet(model, 0.5), "vgg-half", base_model="my-org/vgg-nested",
                metrics={"accuracy": 0.93})
    half = load_subnet("vgg-half", model_of_the_base_architecture)
    ```

    Args:
        subnet (`nn.Module`): what `extract_subnet` returned.
        folder (`str` or `os.PathLike`): the folder to write.
        base_model (`str`, *optional*): the nested network it was cut from (Hub id or description).
        metrics (`Mapping`, *optional*): measured numbers for the card, e.g. `{"accuracy": 0.93, "ece": 0.02}`.
        overwrite (`bool`, *optional*, defaults to `False`): replace the content of an existing non-empty folder.
        repo_id (`str`, *optional*): the Hub repo the folder will be pushed to (named in the card's usage section).

    Raises:
        `ValueError`: `subnet` was not made by `extract_subnet`.
        `FileExistsError`: `folder` is not empty and `overwrite` is False.
    """
    from safetensors.torch import save_model

    from .._io import atomic_directory

    info = subnet_info(subnet)
    metrics = dict(metrics or {})
    card = model_card(subnet, base_model=base_model, metrics=metrics, repo_id=repo_id)
    structure = {"format_version": FORMAT_VERSION, "info": info.to_dict(), "base_model": base_model,
                 "metrics": metrics, "layers": _structure(subnet)}
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as staging:
        save_model(subnet, str(staging / WEIGHTS_FILE))
        (staging / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2) + "\n")
        config = getattr(subnet, "config", None)
        if hasattr(config, "save_pretrained"):
            config = copy.deepcopy(config)
            config.architectures = [type(subnet).__name__]
            config.save_pretrained(str(staging))
        card.save(staging / "README.md")
    return folder


def push_subnet(subnet: nn.Module, repo_id: str, *, folder: str | os.PathLike | None = None,
                base_model: str | None = None, metrics: Mapping[str, Any] | None = None, overwrite: bool = False,
                private: bool | None = None, token: str | None = None, commit_message: str | None = None) -> str:
    """Save a sub-network (`save_subnet`) and push it to `repo_id` as one commit; returns the commit sha.

    The repo is checked first (`hf_regtools.hub.push_target`: offline mode, id, token), before anything is written.
    With `folder` the saved copy stays there; without, it is written to a temporary folder removed afterwards.

    Raises:
        `HubError`: the push failed; the one-line message says why and, with `folder`, that the local copy is
            complete. The Hub repo gets the whole folder in one commit or nothing.
    """
    from ..hub import HubError, push_folder, push_target

    subnet_info(subnet)
    target = push_target(repo_id, token=token)
    message = commit_message or f"Nested sub-network of width {subnet_info(subnet).rho:g}"
    with tempfile.TemporaryDirectory(prefix="nested_subnet_") as scratch:
        output = Path(folder) if folder is not None else Path(scratch) / "subnet"
        save_subnet(subnet, output, base_model=base_model, metrics=metrics, overwrite=overwrite, repo_id=target)
        try:
            return push_folder(output, target, private=private, token=token, commit_message=message)
        except HubError as error:
            if folder is None:
                raise
            raise HubError(f"{error}. The local output in {output} is complete and intact; push it again later "
                           f"with `hf upload {target} {output}`") from error


def load_subnet(source: str | os.PathLike, model: nn.Module | None = None, *, revision: str | None = None) -> nn.Module:
    """Load a sub-network saved by `save_subnet` from a folder or a Hub repo.

    Args:
        source (`str` or `os.PathLike`): the folder, or a Hub repo id (`org/name`).
        model (`nn.Module`, *optional*): a model of the base architecture (full width, plain or converted with
            `convert_to_nested`; its weights are replaced). Optional for transformers models, which are rebuilt from
            the saved `config.json`.
        revision (`str`, *optional*): branch, tag or commit on the Hub.

    Returns:
        The sub-network, in evaluation mode, with its `SubnetInfo` as `.nested_subnet_info`.

    Raises:
        `ValueError`: the folder has no `nested_subnet.json`, or no `model` is given for a model without a
            transformers config.
    """
    from safetensors.torch import load_model

    folder = _local_folder(source, revision)
    structure_file = folder / STRUCTURE_FILE
    if not structure_file.is_file():
        raise ValueError(f"{source} has no {STRUCTURE_FILE}: it was not saved by save_subnet")
    structure = json.loads(structure_file.read_text())
    if model is None:
        model = _model_from_config(folder, source)
    modules = dict(model.named_modules())
    missing = [name for name in structure["layers"] if name not in modules]
    if missing:
        raise ValueError(f"the model has no modules {missing[:4]}{' ...' if len(missing) > 4 else ''}: pass a model "
                         f"of the architecture {source} was cut from")
    for name, spec in structure["layers"].items():
        module = modules[name]
        if spec["class"] == "norm":
            if module.num_features != spec["num_features"]:
                with torch.no_grad():
                    _slice_norm(module, spec["num_features"])
            continue
        _replace(model, name, _build(spec, like=module))
    load_model(model, str(folder / WEIGHTS_FILE))
    setattr(model, SUBNET_ATTRIBUTE, SubnetInfo.from_dict(structure["info"]))
    return model.eval()


def _build(spec: Mapping[str, Any], *, like: nn.Module) -> nn.Module:
    parameter = next(like.parameters(), None)
    factory = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
    arguments = {key: value for key, value in spec.items() if key != "class"}
    if spec["class"] in _CONV_CLASSES:
        for key in ("kernel_size", "stride", "dilation") + (("padding",) if isinstance(spec["padding"], list) else ()):
            arguments[key] = tuple(arguments[key])
        return torch.nn.utils.skip_init(_CONV_CLASSES[spec["class"]], **arguments, **factory)
    return torch.nn.utils.skip_init(_LINEAR_CLASSES[spec["class"]], **arguments, **factory)


def _local_folder(source: str | os.PathLike, revision: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from ..hub import hub_errors

    with hub_errors("cannot fetch", str(source)):
        return Path(snapshot_download(str(source), revision=revision))


def _model_from_config(folder: Path, source) -> nn.Module:
    config_file = folder / "config.json"
    if config_file.is_file() and "model_type" in json.loads(config_file.read_text()):
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
        architecture = (config.architectures or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is not None:
            return model_class(config)
    raise ValueError(f"{source} holds no transformers config to rebuild the architecture from; pass `model`, a model "
                     "of the base architecture (e.g. the nested network before extraction, or a fresh one)")


def model_card(subnet: nn.Module, *, base_model: str | None = None, metrics: Mapping[str, Any] | None = None,
               repo_id: str | None = None):
    """The `ModelCard` of a sub-network: width, kept channels, parameters, settings, metrics and `base_model`."""
    from .. import hub

    info = subnet_info(subnet)
    card_data: dict[str, Any] = {"tags": ["nested-dropout", "image-classification"],
                                 "pipeline_tag": "image-classification"}
    library = _library(subnet)
    if library:
        card_data["library_name"] = library
    if base_model and hub._is_repo_id(base_model):
        card_data["base_model"] = base_model
    card = hub.build_model_card(
        "nested_dropout_subnet", card_data=card_data, rho=info.rho, base_model=base_model,
        base_on_hub=bool(base_model and hub._is_repo_id(base_model)), channels=info.channels,
        parameters=info.parameters, full_parameters=info.full_parameters,
        parameter_share=info.parameters / info.full_parameters if info.full_parameters else 1.0,
        weight_mode=info.weight_mode, scale_by_keep_prob=info.scale_by_keep_prob, fold_bn=info.fold_bn,
        uncut=list(info.uncut), recalibration_batches=info.recalibration_batches, metrics=dict(metrics or {}),
        repo_id=repo_id or "<this repo>", structure_file=STRUCTURE_FILE)
    settings = {"function": "extract_subnet", "rho": info.rho, "scale_by_keep_prob": info.scale_by_keep_prob,
                "weight_mode": info.weight_mode, "fold_bn": info.fold_bn,
                "recalibration_batches": info.recalibration_batches}
    return hub.add_techniques_to_card(card, [hub.TechniqueUse("nested_dropout", settings)])


def _library(subnet: nn.Module) -> str | None:
    for module in subnet.modules():
        root = type(module).__module__.split(".")[0]
        if root in ("transformers", "timm"):
            return root
    return None
