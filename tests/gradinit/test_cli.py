"""`hf-regtools gradinit`: models from the offline Hub cache or folders, image and text data, saved outputs that reload
to the in-memory result, pushes to the fake Hub, and every user error reported in one line before the work."""

import contextlib
import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools.cli import main as cli_main
from hf_regtools.adapters import save_model
from hf_regtools.gradinit import command
from hf_regtools.gradinit.command import run_gradinit
from hf_regtools.testing.offline_cache import add_to_cache, hub_offline
from hf_regtools.testing.tiny_models import timm_vit, transformers_bert, transformers_vit

EXAMPLES = 23  # not a multiple of the batch size
BATCH = 8
CLASSES = ("zero", "one", "two")
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "the sun is warm today",
             "rain falls on the roof", "a fish swims in the lake", "the moon is bright tonight"]
TEXT_DATASET = f"org/sentences{uuid.uuid4().hex[:8]}"
FAST = ["--iterations", "3", "--batch-size", str(BATCH), "--no-progress"]



def _digit_images():
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = [], []
    for index in range(EXAMPLES):
        label = index % len(CLASSES)
        position = np.flatnonzero(digits.target == label)[index // len(CLASSES)]
        images.append(Image.fromarray((digits.images[position] * 15).astype("uint8"), mode="L"))
        labels.append(label)
    return images, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An image folder, a saved image DatasetDict, a saved text Dataset (23 examples each, 3 classes)."""
    import datasets

    root = tmp_path_factory.mktemp("data")
    images, labels = _digit_images()
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / "imagefolder" / CLASSES[label] / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    features = datasets.Features(img=datasets.Image(), digit=datasets.ClassLabel(names=list(CLASSES)),
                                 note=datasets.Value("string"))
    split = datasets.Dataset.from_dict({"img": images, "digit": labels, "note": ["x"] * EXAMPLES}, features=features)
    datasets.DatasetDict(train=split, test=split.select(range(5))).save_to_disk(str(root / "saved_images"))
    texts = [SENTENCES[i % len(SENTENCES)] + " " + SENTENCES[(3 * i) % len(SENTENCES)] for i in range(EXAMPLES)]
    text_features = datasets.Features(sentence=datasets.Value("string"), label=datasets.ClassLabel(names=list(CLASSES)))
    text = datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=text_features)
    text.save_to_disk(str(root / "saved_text"))
    _cache_as_hub_dataset(text, TEXT_DATASET, root)
    return root


def _cache_as_hub_dataset(dataset, repo_id: str, tmp: Path) -> None:
    """Put `dataset` in the datasets cache as `load_dataset(repo_id)` leaves a Hub dataset there (the layout
    `datasets` falls back to offline: `<cache>/<org>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow`)."""
    import datasets

    dataset.to_parquet(str(tmp / "train.parquet"))
    builder = datasets.load_dataset_builder("parquet", data_files={"train": str(tmp / "train.parquet")})
    builder.download_and_prepare()
    org, name = repo_id.split("/")
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{org}___{name}" / "default" / "0.0.0" / ("0" * 16)
    target.mkdir(parents=True)
    for path in Path(builder.cache_dir).iterdir():
        (target / path.name.replace("parquet-", f"{name}-")).write_bytes(path.read_bytes())


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models as folders and in the offline Hub cache: a transformers ViT with its image processor, a timm ViT
    with a 5-class head, a BERT with a word-level tokenizer; `{"vit": folder, ..., "repos": {...}}`."""
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    folders = {"vit": root / "vit", "timm": root / "timm", "bert": root / "bert"}
    save_model(transformers_vit(num_hidden_layers=2, num_labels=3), folders["vit"])
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folders["vit"])
    save_model(timm_vit(embed_dim=16, depth=2, num_classes=5), folders["timm"])
    tokenizer = _tokenizer()
    save_model(transformers_bert(vocab_size=len(tokenizer)), folders["bert"])
    tokenizer.save_pretrained(folders["bert"])
    suffix = uuid.uuid4().hex[:8]
    repos = {name: f"org/tiny-{name}-{suffix}" for name in folders}
    for name, folder in folders.items():
        add_to_cache(os.environ["HF_HUB_CACHE"], repos[name], folder)
    return {**folders, "repos": repos}


@pytest.fixture
def offline_env(hub_env):
    return {**hub_env, "HF_HUB_OFFLINE": "1"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_same(model: torch.nn.Module, reloaded: torch.nn.Module, prefix: str = ""):
    expected = {key: value for key, value in model.state_dict().items()}
    actual = {key[len(prefix):]: value for key, value in reloaded.state_dict().items() if key.startswith(prefix)}
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value.cpu(), actual[key]), key


def _card_and_scales(output: Path, run):
    card = ModelCard.load(output / "README.md")
    scales = json.loads((output / "gradinit_scales.json").read_text())
    assert scales == json.loads(json.dumps(run.report.to_dict()))
    assert {"hf-regtools", "gradinit"} <= set(card.data.tags)
    assert f"| constraint steps (gradient norm above the cap) | {run.report.constraint_steps} |" in card.text
    assert f"| objective steps | {run.report.objective_steps} |" in card.text
    assert "| `iterations` | `3` |" in card.text and "arXiv:2102.08098" in card.text
    return card


def test_parser_imports_nothing_heavy():
    code = ("import sys\nfrom hf_regtools.cli import main\ntry:\n    main(['gradinit', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'timm', 'datasets', 'huggingface_hub') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--iterations" in out and "--min-scale" in out and "--no-normalize-grad" in out
    assert out.splitlines()[-1] == "HEAVY []"


def test_transformers_image_model_from_the_cache(tmp_path, data, models, offline_env, cli):
    repo = models["repos"]["vit"]
    with hub_offline():
        run = run_gradinit(repo, data / "imagefolder", iterations=3, batch_size=BATCH)
    run.save(tmp_path / "memory")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    output = tmp_path / "memory"
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "config.json", "gradinit_scales.json",
                                                       "model.safetensors", "preprocessor_config.json"]
    reloaded = AutoModelForImageClassification.from_pretrained(output)
    _assert_same(run.model, reloaded)
    assert reloaded.config.id2label == dict(enumerate(sorted(CLASSES)))  # the image folder sorts its classes
    assert AutoImageProcessor.from_pretrained(output).size == {"height": 16, "width": 16}
    before = _weights(models["vit"])
    assert any(not torch.equal(before[key], value) for key, value in _weights(output).items())
    card = _card_and_scales(output, run)
    assert card.data.base_model == repo and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "the model's 3-class head, kept" in card.text and "AutoImageProcessor" in card.text

    codes, out, err = cli([["gradinit", repo, "--data", str(data / "imagefolder"), "--output", str(tmp_path / "cli"),
                            *FAST]], offline_env, allow_loopback=False)
    assert codes == [0], err
    assert "objective steps" in out and f"saved to {tmp_path / 'cli'}" in out
    assert _weights(tmp_path / "cli").keys() == _weights(output).keys()
    assert all(torch.equal(value, _weights(output)[key]) for key, value in _weights(tmp_path / "cli").items())


def test_timm_model_new_head_from_a_saved_dataset_dict(tmp_path, data, models):
    import timm
    from transformers import AutoModelForImageClassification

    repo = models["repos"]["timm"]
    output = tmp_path / "out"
    with hub_offline():
        run = run_gradinit(repo, data / "saved_images", split="train", iterations=3, batch_size=BATCH, seed=1)
    run.save(output)
    assert run.data.inputs == ("img",) and run.data.label_column == "digit" and len(run.data) == EXAMPLES
    assert run.model.num_classes == 3 and "new 3-class head (the model's head has 5 classes)" == run.head
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "config.json", "gradinit_scales.json",
                                                       "model.safetensors"]
    config = json.loads((output / "config.json").read_text())
    assert config["num_classes"] == 3 and config["pretrained_cfg"]["label_names"] == list(CLASSES)
    _assert_same(run.model, timm.create_model(f"local-dir:{output}", pretrained=True))
    _assert_same(run.model, AutoModelForImageClassification.from_pretrained(output), prefix="timm_model.")
    card = _card_and_scales(output, run)
    assert card.data.base_model == repo and card.data.library_name == "timm"
    assert "resolve_data_config" in card.text and "TimmWrapper" in card.text

    with hub_offline():
        assert cli_main(["gradinit", f"hf-hub:{repo}", "--data", str(data / "saved_images"), "--seed", "1",
                         "--output", str(tmp_path / "cli"), *FAST]) == 0
    assert all(torch.equal(value, _weights(output)[key]) for key, value in _weights(tmp_path / "cli").items())


def test_text_model_with_tokenizer_from_the_cache(tmp_path, data, models, monkeypatch):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    repo = models["repos"]["bert"]
    settings = dict(iterations=3, batch_size=BATCH, max_length=8, lr=1e-2, algorithm="adam")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with hub_offline():
        run = run_gradinit(repo, data / "saved_text", **settings)
        by_name = run_gradinit(repo, TEXT_DATASET, **settings)
    assert by_name.data.description.startswith(f"`{TEXT_DATASET}` (dataset), split train")
    _assert_same(run.model, by_name.model)
    output = run.save(tmp_path / "out")
    names = sorted(p.name for p in output.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "gradinit_scales.json", "model.safetensors"} <= set(names)
    _assert_same(run.model, AutoModelForSequenceClassification.from_pretrained(output))
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("the cat")["input_ids"] == _tokenizer()("the cat")["input_ids"]
    card = _card_and_scales(output, run)
    assert card.data.pipeline_tag == "text-classification" and "truncation to 8 tokens" in card.text
    assert "| `algorithm` | `adam` |" in card.text and "AutoTokenizer" in card.text


def test_push_to_the_fake_hub(tmp_path, data, models, fake_hub, capsys):
    from huggingface_hub import hf_hub_download

    repo = f"org/gradinit-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "out"
    assert cli_main(["gradinit", str(models["vit"]), "--data", str(data / "imagefolder"), "--output", str(output),
                     "--push-to-hub", repo, *FAST]) == 0
    assert f"pushed to {repo} (commit " in capsys.readouterr().out
    files = sorted(p.name for p in output.iterdir())
    assert sorted(fake_hub.files(repo)) == files
    for name in files:
        assert Path(hf_hub_download(repo, name)).read_bytes() == (output / name).read_bytes()
    card = ModelCard.load(repo)
    assert "base_model" not in card.data.to_dict() and "gradinit" in card.data.tags
    assert f'from_pretrained("{repo}")' in card.text


def test_errors_before_the_work(tmp_path, data, models, fake_hub, offline_env, cli, capsys, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    images, text, vit = str(data / "imagefolder"), str(data / "saved_text"), str(models["vit"])
    absent = f"org/absent-{uuid.uuid4().hex[:8]}"
    requests_before = len(fake_hub.requests)

    def gradinit(model, dataset, output, *extra):
        return ["gradinit", model, "--data", dataset, "--output", str(tmp_path / output), *FAST, *extra]

    runs = [
        (gradinit(absent, images, "full", "--push-to-hub", absent), "pass --overwrite to replace its content"),
        (gradinit(absent, str(tmp_path / "nope"), "a"), f"--data {tmp_path / 'nope'}: no such folder"),
        (gradinit(absent, str(models["vit"]), "b"), "is neither a dataset saved with `save_to_disk`"),
        (gradinit(absent, "./nope/", "c"), "--data ./nope/: no such folder"),
        (gradinit(vit, images, "d", "--iterations", "0"), "invalid GradInit setting (--iterations 0)"),
        (gradinit(vit, images, "e", "--min-scale", "2", "--max-scale", "1"), "--max-scale 1"),
        (gradinit(absent, images, "f"), f"{absent!r} is neither a local folder"),
        (gradinit(vit, images, "g", "--label-column", "digit"),
         "has no column 'digit'; its columns are image, label. Name the label column with --label-column"),
        (gradinit(vit, text, "h"), "has no image column; its columns are sentence, label. Name the image column "
                                   "with --image-column"),
        (gradinit(str(models["bert"]), images, "i"), "has no text column; its columns are image, label"),
        (gradinit(vit, str(data / "saved_images"), "j", "--split", "validation"),
         "has no split 'validation'; choose --split among train, test"),
        (gradinit(vit, str(data / "saved_images"), "k", "--image-column", "note"), "--image-column note: the column "
                                                                                    "holds Value(string), not images"),
        (gradinit(vit, images, "l", "--num-labels", "2"), "--num-labels 2: the data has 3 classes"),
        (gradinit(vit, images, "m", "--batch-size", "64"), "--batch-size 64: the data has only 23 examples"),
        (gradinit(vit, "org/no-such-data", "n"), "--data org/no-such-data: cannot load it"),
        (gradinit(str(models["bert"]), TEXT_DATASET, "o", "--split", "test"), "choose another --split"),
    ]
    codes, out, err = cli([argv for argv, _ in runs], offline_env, allow_loopback=False)
    lines = [line for line in err.splitlines() if line.startswith("hf-regtools gradinit: error: ")]
    assert codes == [2] * len(runs) and len(lines) == len(runs) and "Traceback" not in err, err
    for line, (_, message) in zip(lines, runs):
        assert message in line, (message, line)
    assert "offline mode is on" in lines[0] or "pass --overwrite" in lines[0]

    for push, message in ((absent, "offline mode is on (HF_HUB_OFFLINE=1)"), ("org/x/y", "not a valid repo id"),
                          (absent, "not logged in")):
        if message == "not logged in":
            monkeypatch.setenv("HF_TOKEN", "")
        with hub_offline() if "offline" in message else contextlib.nullcontext():
            assert cli_main(gradinit(absent, images, "p", "--push-to-hub", push)) == 2
        assert message in capsys.readouterr().err
    assert (full / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert not any(absent in path for _, path in fake_hub.requests[requests_before:])


def test_bad_option_values_name_the_option(capsys):
    for argv, message in ((["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
                          (["--betas", "0.9"], "argument --betas: expected 2 comma-separated float values"),
                          (["--algorithm", "lbfgs"], "argument --algorithm: invalid choice: 'lbfgs'"),
                          (["--batch-size", "0"], "argument --batch-size: expected a positive integer")):
        with pytest.raises(SystemExit) as exited:
            cli_main(["gradinit", "m", "--data", "d", "--output", "o", *argv])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_failed_save_leaves_nothing_half_written(tmp_path, data, models, monkeypatch, capsys):
    def full_disk(source, destination):
        assert (Path(destination).parent / "model.safetensors").is_file()  # the weights are already written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(command.shutil, "copyfile", full_disk)
    target = tmp_path / "out"
    argv = ["gradinit", str(models["vit"]), "--data", str(data / "imagefolder"), "--output", str(target), *FAST]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("No space left on device") and list(tmp_path.iterdir()) == []

    target.mkdir()
    (target / "old.txt").write_text("old")
    assert cli_main([*argv, "--overwrite"]) == 2
    assert [p.name for p in target.iterdir()] == ["old.txt"] and list(tmp_path.iterdir()) == [target]


def test_random_init_from_a_config_without_weights(tmp_path, data, models, capsys):
    import shutil

    config_only = tmp_path / "config-only"
    shutil.copytree(models["timm"], config_only)
    (config_only / "model.safetensors").unlink()
    argv = ["gradinit", str(config_only), "--data", str(data / "imagefolder"), *FAST]
    assert cli_main([*argv, "--output", str(tmp_path / "refused")]) == 2
    assert "has no weights (no *.safetensors or pytorch_model.bin); pass --random-init" in capsys.readouterr().err
    def run(seed):
        return run_gradinit(config_only, data / "imagefolder", random_init=True, seed=seed, iterations=2,
                            batch_size=BATCH)

    first, again, other = run(0), run(0), run(1)
    _assert_same(first.model, again.model)
    assert not torch.equal(first.model.head.weight, other.model.head.weight)
    assert first.head == "new 3-class head (random initialization, like the rest of the model)"
    assert cli_main([*argv, "--random-init", "--output", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "random initialization of the config" in card.text and "base_model" not in card.data.to_dict()


def test_column_and_label_detection(tmp_path):
    import datasets

    from hf_regtools.gradinit.command import GradInitCommandError, load_data

    pairs = datasets.Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["d", "e", "f"],
                                        "category": ["yes", "no", "yes"], "idx": [0, 1, 2]})
    pairs.save_to_disk(str(tmp_path / "pairs"))
    spec = load_data(tmp_path / "pairs", task="text")
    assert spec.inputs == ("premise", "hypothesis") and spec.label_column == "category"
    assert spec.label_names == ["no", "yes"] and spec.label_ids == {"no": 0, "yes": 1}
    assert load_data(tmp_path / "pairs", task="text", text_column="hypothesis", label_column="idx").label_names == [
        "0", "1", "2"]
    unlabeled = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [-1, -1]})
    unlabeled.save_to_disk(str(tmp_path / "unlabeled"))
    problems = [((tmp_path / "unlabeled",), {}, "negative labels (-1)"),
                ((tmp_path / "pairs",), {"text_column": "a,b,c"}, "give one column, or two comma-separated"),
                ((tmp_path / "pairs",), {"text_column": "idx"}, "--text-column idx: the column holds Value(int64)"),
                ((tmp_path / "pairs",), {"label_column": "premise", "text_column": "hypothesis"}, None)]
    for args, kwargs, message in problems:
        if message is None:
            assert load_data(*args, task="text", **kwargs).label_names == ["a", "b", "c"]
            continue
        with pytest.raises(GradInitCommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_data(*args, task="text", **kwargs)


def test_options_map_onto_the_config():
    from hf_regtools.cli import _parser
    from hf_regtools.gradinit.command import config_from_args
    from hf_regtools.gradinit.config import REFERENCE_MODULE_TYPES, GradInitConfig
    from hf_regtools.gradinit.functional import NIO_DEFAULTS

    def config(*options):
        return config_from_args(_parser().parse_args(["gradinit", "m", "--data", "d", "--output", "o", *options]))

    assert config() == GradInitConfig()
    assert config("--iterations", "7", "--lr", "0.01", "--algorithm", "adam", "--inner-lr", "1e-3", "--gamma", "inf",
                  "--min-scale", "0.1", "--max-scale", "100", "--grad-clip", "0", "--no-normalize-grad",
                  "--second-order", "--batch-no-overlap", "--betas", "0.9,0.98", "--module-types", "Linear,Conv2d") \
        == GradInitConfig(iterations=7, lr=0.01, algorithm="adam", inner_lr=1e-3, gamma=float("inf"), min_scale=0.1,
                          max_scale=100.0, grad_clip=0.0, normalize_grad=False, second_order=True,
                          batch_no_overlap=True, betas=(0.9, 0.98), module_types=("Linear", "Conv2d"))
    assert config("--module-types", "reference").module_types == REFERENCE_MODULE_TYPES
    assert config("--max-scale", "none").max_scale is None
    nio = config("--objective", "gc_gn_sqrt", "--nio-chunks", "8")
    assert (nio.gamma, nio.lr, nio.nio_chunks) == (NIO_DEFAULTS["gamma"], NIO_DEFAULTS["lr"], 8)
    assert config("--objective", "gc", "--gamma", "2").gamma == 2.0
