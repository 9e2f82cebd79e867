"""`hf-regtools select-data`: saved dataset and image folder inputs, a timm backbone folder, the output folder
(subset, report, plot, dataset card), the push to the fake Hub as a dataset repo and its pull, and the user errors
(exit code 2, one line, no output folder)."""

import json
import uuid

import pytest

from hf_regtools.cli import main as cli_main

from .prototype_data import SOURCE_NAMES, TARGET_NAMES, source_dataset, target_dataset, timm_backbone


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved target DatasetDict, the source as an image folder and as a saved Dataset, and two backbone folders."""
    import datasets

    from hf_regtools.adapters import save_model

    root = tmp_path_factory.mktemp("select_data")
    target = target_dataset()
    datasets.DatasetDict(train=target, test=target.select(range(4))).save_to_disk(str(root / "target"))
    source = source_dataset()
    source.save_to_disk(str(root / "source"))
    for index, row in enumerate(source):
        path = root / "source_images" / SOURCE_NAMES[row["label"]] / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        row["image"].save(path)
    save_model(timm_backbone(), root / "timm")
    save_model(timm_backbone(num_classes=0, global_pool=""), root / "timm_flat")
    return root


def _args(inputs, output, *extra, source=None, target=None):
    return ["select-data", "--target", str(target or inputs / "target"), "--source", str(source or inputs / "source"),
            "--backbone", str(inputs / "timm"), "--num-classes", "3", "--output", str(output), "--no-progress",
            *extra]


def test_output_folder(inputs, tmp_path, capsys):
    import datasets
    from huggingface_hub import DatasetCard

    output = tmp_path / "out"
    assert cli_main(_args(inputs, output, "--cache-dir", str(tmp_path / "cache"), "--seed", "0")) == 0
    assert "selected 3 classes of" in capsys.readouterr().out
    subset = datasets.load_from_disk(str(output))
    report = json.loads((output / "report.json").read_text())
    assert len(report["class_ids"]) == 3 and report["class_names"] == [SOURCE_NAMES[i] for i in report["class_ids"]]
    assert sorted(set(subset["label"])) == sorted(report["class_ids"]) and len(subset) == report["num_examples"] == 15
    assert (output / "report.png").read_bytes()[:4] == b"\x89PNG"
    card = DatasetCard.load(output / "README.md")
    assert {"hf-regtools", "data-selection"} <= set(card.data.tags)
    meta = card.data.hf_regtools
    assert meta["target"] == str(inputs / "target") and meta["source"] == str(inputs / "source")
    assert meta["backbone"] == str(inputs / "timm") and meta["settings"]["p_m"] == 0.1
    assert [row["id"] for row in meta["selected_classes"]] == report["class_ids"]
    for name in report["class_names"]:
        assert f"| {name} |" in card.text

    again = tmp_path / "again"  # the image folder source gives the same classes; the cache serves the target
    assert cli_main(_args(inputs, again, "--cache-dir", str(tmp_path / "cache"),
                          source=inputs / "source_images")) == 0
    assert json.loads((again / "report.json").read_text())["class_ids"] == report["class_ids"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_push_to_the_fake_hub_and_pull(inputs, tmp_path, fake_hub, capsys):
    import datasets
    from huggingface_hub import DatasetCard, snapshot_download

    repo = f"org/selected-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "out"
    assert cli_main(_args(inputs, output, "--push-to-hub", repo)) == 0
    assert f"pushed to {repo} (commit " in capsys.readouterr().out
    files = fake_hub.files(repo, repo_type="dataset")
    assert {"README.md", "report.json", "report.png", "state.json", "dataset_info.json"} <= set(files)
    for name, content in files.items():
        assert (output / name).read_bytes() == content, name
    pulled = snapshot_download(repo, repo_type="dataset", cache_dir=tmp_path / "pull")
    local, remote = datasets.load_from_disk(str(output)), datasets.load_from_disk(pulled)
    assert remote["label"] == local["label"] and remote.features == local.features
    assert DatasetCard.load(repo).data.hf_regtools["selected_classes"] == \
        DatasetCard.load(output / "README.md").data.hf_regtools["selected_classes"]


def test_source_streamed_from_a_hub_dataset_repo_gives_the_same_selection(inputs, tmp_path, fake_hub, capsys):
    """`--source org/name --streaming`: datasets' own `load_dataset(..., streaming=True)` against the fake Hub (a
    parquet upload), the same classes and examples as the saved source."""
    import datasets
    from huggingface_hub import HfApi

    repo = f"org/source-{uuid.uuid4().hex[:8]}"
    upload = tmp_path / "upload" / "data"
    upload.mkdir(parents=True)
    datasets.load_from_disk(str(inputs / "source")).to_parquet(str(upload / "train-00000-of-00001.parquet"))
    api = HfApi()
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(folder_path=str(upload.parent), repo_id=repo, repo_type="dataset")
    assert cli_main(_args(inputs, tmp_path / "saved", "--seed", "0")) == 0
    assert cli_main(_args(inputs, tmp_path / "streamed", "--seed", "0", "--streaming", source=repo)) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "saved" / "report.json").read_text())
    streamed = json.loads((tmp_path / "streamed" / "report.json").read_text())
    assert streamed["class_ids"] == saved["class_ids"] and streamed["num_examples"] == saved["num_examples"]
    assert streamed["weights"] == pytest.approx(saved["weights"], rel=1e-6)
    assert sorted(datasets.load_from_disk(str(tmp_path / "streamed"))["label"]) == \
        sorted(datasets.load_from_disk(str(tmp_path / "saved"))["label"])


def test_failed_push_keeps_the_complete_output(inputs, tmp_path, fake_hub, capsys):
    fake_hub.add_fault("POST", r"/api/datasets/.*/commit/.*", 500)
    output = tmp_path / "out"
    assert cli_main(_args(inputs, output, "--push-to-hub", f"org/x-{uuid.uuid4().hex[:8]}")) == 2
    error = capsys.readouterr().err
    assert f"The local output in {output} is complete and intact" in error and "--repo-type dataset" in error
    assert (output / "README.md").is_file() and (output / "state.json").is_file()


def test_errors_in_one_line_and_no_output(inputs, tmp_path, capsys):
    import datasets

    empty = tmp_path / "empty_class"
    target_dataset().cast_column("label", datasets.ClassLabel(names=[*TARGET_NAMES, "three"])).save_to_disk(str(empty))
    flat = ["--backbone", str(inputs / "timm_flat")]
    pixels = tmp_path / "pixels"
    import torch

    datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 3, 16, 16).numpy(), "label": [0, 1] * 2}).save_to_disk(
        str(pixels / "small"))
    datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 3, 64, 64).numpy(), "label": [0, 1] * 2}).save_to_disk(
        str(pixels / "large"))
    text = tmp_path / "text"
    datasets.Dataset.from_dict({"pixel_values": [[1.0, 2.0]] * 4, "label": [0, 1] * 2}).save_to_disk(str(text))
    cases = [
        (_args(inputs, tmp_path / "o1", "--label-column", "fine"),
         "has no label column 'fine'; its columns are image, label, note"),
        (_args(inputs, tmp_path / "o2", target=empty), "class 'three' of its ClassLabel has no examples"),
        (_args(inputs, tmp_path / "o3")[:8] + ["7", *_args(inputs, tmp_path / "o3")[9:]],
         "--num-classes 7 is larger than the 6 classes of the source"),
        (_args(inputs, tmp_path / "o4", *flat, target=pixels / "small", source=pixels / "large"),
         "gives 64-d features on the target"),
        (_args(inputs, tmp_path / "o5", target=text, source=text), "gives no features"),
        (_args(inputs, tmp_path / "o6", source=tmp_path / "absent"), "no such folder"),
        (_args(inputs, tmp_path / "o7", "--source-split", "test"), "is a single saved Dataset; drop --source-split test"),
        (_args(inputs, tmp_path / "o8", "--target-split", "valid"), "has no split 'valid'; choose --target-split among train, test"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("hf-regtools select-data: error: "), errors
        assert message in errors[0], errors
        assert not any(tmp_path.glob(f"{argv[argv.index('--output') + 1].rpartition('/')[2]}*")), argv
    output = tmp_path / "taken"
    output.mkdir()
    (output / "x").write_text("x")
    assert cli_main(_args(inputs, output)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
