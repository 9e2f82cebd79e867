"""The scripts in `examples/`, each run in a subprocess in a short smoke mode against the session's fake Hub.

Every run goes through a bootstrap that installs the loopback-only network guard and then runs the script as
`__main__` (with its folder on `sys.path`, as `python examples/x.py` has it), so `torchrun` can launch it too.
"""

import json
import os
import runpy
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_regtools.adapters import save_model
from hf_regtools.hub import push_folder
from hf_regtools.schedules import drop_schedule, svrg_alpha_schedule
from hf_regtools.testing.tiny_models import timm_vit, transformers_vit
from hf_regtools.weight_selection import initialize_student

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BOOTSTRAP = """
import runpy, sys
from hf_regtools.testing.network import install_network_guard
install_network_guard()
script = sys.argv.pop(1)
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""
SMOKE = ["--max_train_samples", "256", "--max_eval_samples", "64", "--logging_steps", "1", "--disable_tqdm", "true"]


def repo(name):
    return f"org/{name}-{uuid.uuid4().hex[:8]}"


def run_example(script, args, env, tmp_path, *, torchrun_processes=None):
    bootstrap = tmp_path / "bootstrap.py"
    bootstrap.write_text(BOOTSTRAP)
    launcher = [sys.executable] if torchrun_processes is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun_processes)]
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    proc = subprocess.run([*launcher, str(bootstrap), str(EXAMPLES / script), *map(str, args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def log_history(output_dir):
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def step_logs(output_dir, metric):
    """`{step: value}` of a metric in the per-step training logs (the entries with a loss)."""
    return {entry["step"]: entry[metric] for entry in log_history(output_dir) if "loss" in entry}


def test_every_example_documents_its_launch_lines():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert scripts == ["alpha_svrg.py", "data_selection.py", "dropout_schedules.py", "gradinit.py", "label_noise.py",
                       "large_lr.py", "nested_dropout.py", "self_distillation.py", "stochnorm.py",
                       "weight_rescaling.py", "weight_selection.py", "weissi.py"]
    for name in scripts:
        header = (EXAMPLES / name).read_text().split('"""')[1]
        assert f"python examples/{name}" in header and f"torchrun --nproc_per_node 2 examples/{name}" in header, name
        assert f"examples/{name}" in (ROOT / "README.md").read_text(), name


@pytest.mark.parametrize("library", ["transformers", "timm"])


def test_weight_selection_example_pushes_a_student_that_loads_back(library, tmp_path, fake_hub, hub_env):
    torch.manual_seed(0)
    teacher = transformers_vit(hidden_size=16, num_hidden_layers=3) if library == "transformers" else timm_vit(
        embed_dim=16, depth=3)
    save_model(teacher, tmp_path / "teacher")
    teacher_repo, student_repo = repo("teacher"), repo("student")
    push_folder(tmp_path / "teacher", teacher_repo)

    out = tmp_path / "student"
    proc = run_example("weight_selection.py", ["--teacher", teacher_repo, "--hidden_size", "8", "--depth", "2",
                                               "--num_labels", "10", "--output_dir", out, "--push_to_hub",
                                               "--hub_model_id", student_repo], hub_env, tmp_path)
    assert f"pushed to {student_repo}" in proc.stdout
    files = fake_hub.files(student_repo)
    assert {"README.md", "config.json", "model.safetensors"} <= files.keys()
    assert all(files[p.name] == p.read_bytes() for p in out.iterdir())
    assert ModelCard.load(student_repo).data.base_model == teacher_repo

    if library == "timm":
        import timm

        student = timm.create_model(f"hf-hub:{student_repo}", pretrained=True)
    else:
        from transformers import AutoModelForImageClassification

        student = AutoModelForImageClassification.from_pretrained(student_repo)
    expected = initialize_student(tmp_path / "teacher", hidden_size=8, depth=2, num_labels=10)
    loaded, expected_weights = student.state_dict(), expected.model.state_dict()
    assert loaded.keys() == expected_weights.keys() and expected.report.loaded
    for key in expected.report.loaded:  # the classifier is left at its (random) initialization
        assert torch.equal(loaded[key], expected_weights[key]), key


def test_dropout_example_fine_tunes_a_hub_model_and_pushes_it(tmp_path, fake_hub, hub_env):
    """A transformers ViT from the Hub (16x16 RGB, 3 classes): digits resized, a new 10-class head, early dropout."""
    torch.manual_seed(0)
    save_model(transformers_vit(hidden_size=16, num_hidden_layers=2), tmp_path / "pretrained")
    model_repo, trained_repo = repo("pretrained"), repo("early-dropout")
    push_folder(tmp_path / "pretrained", model_repo)
    out = tmp_path / "run"
    run_example("dropout_schedules.py", ["--model", model_repo, "--technique", "early-dropout", "--max_steps", "8",
                                         "--cutoff_fraction", "0.5", *SMOKE, "--output_dir", out, "--push_to_hub",
                                         "--hub_model_id", trained_repo], hub_env, tmp_path)
    rates = step_logs(out, "hf_regtools/dropout_schedules/dropout_rate")
    assert rates == {s: drop_schedule(s - 1, p=0.1, cutoff_step=4, schedule="linear") for s in range(1, 9)}
    assert rates[1] == 0.1 and rates[8] == 0.0
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1.0

    from transformers import ViTForImageClassification

    trained = ViTForImageClassification.from_pretrained(trained_repo)
    assert trained.config.num_labels == 10 and trained.config.image_size == 16
    assert fake_hub.files(trained_repo)["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = ModelCard.load(trained_repo)
    assert {"hf-regtools", "dropout-schedules"} <= set(card.data.tags) and "EarlyDropoutCallback" in card.text


def test_dropout_example_late_stochastic_depth_on_a_timm_model(tmp_path, hub_env):
    """`--model timm-vit`: a timm ViT as transformers' `TimmWrapperForImageClassification`, built from a config."""
    out = tmp_path / "run"
    run_example("dropout_schedules.py", ["--model", "timm-vit", "--technique", "late-stochastic-depth",
                                         "--max_steps", "6", "--cutoff_fraction", "0.5", *SMOKE, "--output_dir", out],
                hub_env, tmp_path)
    rates = step_logs(out, "hf_regtools/dropout_schedules/drop_path_rate")
    assert rates == {s: drop_schedule(s - 1, p=0.4, cutoff_step=3, mode="late") for s in range(1, 7)}

    from transformers import TimmWrapperForImageClassification

    trained = TimmWrapperForImageClassification.from_pretrained(out)
    assert type(trained.timm_model).__name__ == "VisionTransformer" and trained.config.num_labels == 10


def test_dropout_example_rejects_a_technique_the_model_lacks_before_training(tmp_path, monkeypatch, capsys):
    """In this process (the check needs no subprocess): a usage error, no traceback, nothing trained."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["dropout_schedules.py", "--model", "transformers-vit", "--technique",
                                      "early-stochastic-depth", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "dropout_schedules.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert ("--technique early-stochastic-depth does not apply to --model transformers-vit: transformers vit has no "
            "stochastic depth") in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.safetensors"))


@pytest.mark.multiprocess


def test_dropout_example_on_two_processes_with_torchrun(tmp_path, hub_env):
    """256 images, 32 per process: one epoch is 4 optimizer steps on 2 processes (it would be 8 on one)."""
    out = tmp_path / "run"
    run_example("dropout_schedules.py", ["--model", "transformers-vit", "--technique", "early-dropout",
                                         "--num_train_epochs", "1", "--per_device_train_batch_size", "32",
                                         "--cutoff_fraction", "0.5", *SMOKE, "--output_dir", out],
                hub_env, tmp_path, torchrun_processes=2)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    rates = step_logs(out, "hf_regtools/dropout_schedules/dropout_rate")
    assert rates == {s: drop_schedule(s - 1, p=0.1, cutoff_step=2, schedule="linear") for s in range(1, 5)}


@pytest.mark.parametrize("mode", ["snapshot", "cache"])


def test_alpha_svrg_example(mode, tmp_path, hub_env):
    """300 images in batches of 64 (the last one 44): 5 steps per epoch, alpha 0.75 -> 0.375 -> 0 over 3 epochs."""
    out = tmp_path / "run"
    run_example("alpha_svrg.py", ["--svrg_mode", mode, "--num_train_epochs", "3", *SMOKE,
                                  "--max_train_samples", "300", "--output_dir", out], hub_env, tmp_path)
    alphas = step_logs(out, "hf_regtools/alpha_svrg/alpha")
    assert alphas == {s: svrg_alpha_schedule(s - 1, alpha0=0.75, epochs=3, steps_per_epoch=5, snapshot_every=5)
                      for s in range(1, 16)}
    assert alphas[5] == 0.75 and alphas[6] == 0.375 and alphas[15] == 0.0
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.max_grad_norm == 0.0
    losses = [entry["loss"] for entry in log_history(out) if "loss" in entry]
    assert len(losses) == 15 and all(0.0 < loss < 10.0 for loss in losses)
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1.0


def test_stochnorm_example_fine_tunes_and_pushes_a_model_that_loads_as_the_original_architecture(
        tmp_path, fake_hub, hub_env):
    out, trained_repo = tmp_path / "run", repo("stochnorm")
    run_example("stochnorm.py", ["--model", "transformers-resnet", "--p", "0.3", "--max_steps", "4", *SMOKE,
                                 "--output_dir", out, "--push_to_hub", "--hub_model_id", trained_repo], hub_env, tmp_path)
    assert step_logs(out, "hf_regtools/stochnorm/p") == {s: 0.3 for s in range(1, 5)}

    from transformers import ResNetForImageClassification

    trained, info = ResNetForImageClassification.from_pretrained(trained_repo, output_loading_info=True)
    batch_norms = sum(type(module) is torch.nn.BatchNorm2d for module in trained.modules())
    assert not any(info.values()) and batch_norms > 0
    assert set(step_logs(out, "hf_regtools/stochnorm/layers").values()) == {batch_norms}
    assert int(trained.resnet.embedder.embedder.normalization.num_batches_tracked) == 4
    card = ModelCard.load(trained_repo)
    assert {"hf-regtools", "stochnorm"} <= set(card.data.tags) and "StochNormCallback" in card.text


def test_stochnorm_example_rejects_a_layernorm_model_before_training(tmp_path, monkeypatch, capsys):
    save_model(transformers_vit(hidden_size=16, num_hidden_layers=2), tmp_path / "vit")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["stochnorm.py", "--model", str(tmp_path / "vit"), "--output_dir",
                                      str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / "stochnorm.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "ViTForImageClassification has no BatchNorm layer" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.safetensors"))


def test_weight_rescaling_example_keeps_every_bn_preceded_filter_at_norm_r(tmp_path, hub_env):
    """6 steps of a transformers ResNet: the norms before each rescale are logged, the saved filters have norm 0.5."""
    out = tmp_path / "run"
    run_example("weight_rescaling.py", ["--max_steps", "6", "--r", "0.5", *SMOKE, "--output_dir", out], hub_env,
                tmp_path)
    means = step_logs(out, "hf_regtools/weight_rescaling/mean_norm_before")
    assert sorted(means) == list(range(1, 7)) and all(value > 0.5 for value in means.values())
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    filters = [key for key in weights if key.endswith("convolution.weight")]
    assert len(filters) == 9  # stem, 2 per stage, 2 shortcuts
    for key in filters:
        torch.testing.assert_close(weights[key].flatten(1).norm(dim=1), torch.full((weights[key].shape[0],), 0.5),
                                   atol=1e-5, rtol=0)
    assert weights["classifier.1.weight"].flatten(1).norm(dim=1).std() > 0


def test_weissi_example_logs_the_penalty_and_measures_the_input_gradient(tmp_path, hub_env):
    """4 steps of the MLP: the penalty's parts are logged at every step, the input gradient and the bound saved."""
    out = tmp_path / "run"
    run_example("weissi.py", ["--max_steps", "4", *SMOKE, "--output_dir", out], hub_env, tmp_path)
    penalties = step_logs(out, "hf_regtools/weissi/penalty")
    assert sorted(penalties) == [1, 2, 3, 4] and all(value > 0 for value in penalties.values())
    results = json.loads((out / "input_gradient_results.json").read_text())
    assert 0 < results["eval_input_gradient_norm"] and results["eval_norm_bound"] > 0


def test_gradinit_example(tmp_path, hub_env):
    out = tmp_path / "run"
    run_example("gradinit.py", ["--max_steps", "3", "--gradinit_iterations", "4", *SMOKE, "--output_dir", out], hub_env,
                tmp_path)
    report = json.loads((out / "gradinit_scales.json").read_text())
    assert report["constraint_steps"] + report["objective_steps"] == 4 and report["scales"]
    logs = step_logs(out, "hf_regtools/gradinit/constraint_steps")
    assert logs == {s: report["constraint_steps"] for s in range(1, 4)}


def test_nested_dropout_example_trains_and_pushes_a_sub_network(tmp_path, fake_hub, hub_env):
    out, subnet_repo = tmp_path / "run", repo("nested-subnet")
    proc = run_example("nested_dropout.py", ["--model", "vgg", "--max_steps", "4", "--widths", "0,1",
                                             "--subnet_width", "0.5", "--passes", "2", *SMOKE, "--output_dir", out,
                                             "--push_to_hub", "--hub_model_id", subnet_repo], hub_env, tmp_path)
    assert set(step_logs(out, "hf_regtools/nested_dropout/kl")) == {1, 2, 3, 4}
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 0.5", "| 1"]
    assert {"README.md", "model.safetensors", "nested_subnet.json"} <= set(fake_hub.files(subnet_repo))
    card = ModelCard.load(subnet_repo)
    assert "nested-dropout" in card.data.tags and "width `rho` | 0.5" in card.text

    from hf_regtools.nested_dropout import load_subnet
    from hf_regtools.testing.tiny_models import VGGClassifier

    subnet = load_subnet(subnet_repo, VGGClassifier(config=(16, "M", 32, 32), hidden=32, num_labels=10, channels=1))
    assert subnet.nested_subnet_info.rho == 0.5 and subnet(torch.zeros(2, 1, 8, 8))["logits"].shape == (2, 10)


def test_data_selection_example_prints_the_table(tmp_path, hub_env):
    out = tmp_path / "run"
    proc = run_example("data_selection.py", ["--seeds", "0", "--steps", "4", "--pretrain_steps", "4",
                                             "--output_dir", out], hub_env, tmp_path)
    methods = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ") and "0." in line]
    assert methods == ["| target only", "| UOT-selected", "| random classes"]
    results = json.loads((out / "data_selection_results.json").read_text())["results"]
    assert [row["method"] for row in results] == ["target only", "UOT-selected", "random classes"]
    assert 0 <= results[1]["close_fraction"] <= 1 and results[0]["close_fraction"] is None


def test_self_distillation_example_rounds_resume_and_weight_selection(tmp_path, hub_env, monkeypatch, capsys):
    """Rounds (1, then 2 resuming the first), weight selection + distillation, and the kernel theory in-process."""
    out = tmp_path / "rounds"
    common = ["--max_steps", "2", *SMOKE, "--max_train_samples", "64", "--max_eval_samples", "32"]
    run_example("self_distillation.py", ["--experiment", "rounds", "--rounds", "1", *common, "--output_dir", out],
                hub_env, tmp_path)
    proc = run_example("self_distillation.py", ["--experiment", "rounds", "--rounds", "2", "--loss", "kl",
                                                "--alpha", "0.5", *common, "--output_dir", out], hub_env, tmp_path)
    assert "| 1 | found |" in proc.stdout and "| 2 | trained |" in proc.stdout
    assert set(step_logs(out / "round-2", "hf_regtools/self_distillation/round").values()) == {2}
    assert "hf_regtools/self_distillation/distill_loss" in log_history(out / "round-2")[0]
    assert "hf_regtools/self_distillation/distill_loss" not in log_history(out / "round-1")[0]

    proc = run_example("self_distillation.py", ["--experiment", "weight-selection", *common, "--output_dir",
                                                tmp_path / "ws"], hub_env, tmp_path)
    results = json.loads((tmp_path / "ws" / "weight_selection_results.json").read_text())
    assert len(results) == 5 and all(0.0 <= value <= 1.0 for value in results.values())
    assert "student, weight selection + distillation" in proc.stdout

    proc = run_example("self_distillation.py", ["--experiment", "weight-selection-text", "--loss", "kl", "--alpha",
                                                "0.5", *common, "--output_dir", tmp_path / "text"], hub_env, tmp_path)
    results = json.loads((tmp_path / "text" / "weight_selection_text_results.json").read_text())
    assert len(results) == 5 and all(0.0 < value < 6.0 for value in results.values())
    assert "hf_regtools/self_distillation/distill_loss" in proc.stdout
    assert "student, weight selection + distillation" in proc.stdout

    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["self_distillation.py", "--experiment", "kernel", "--output_dir",
                                      str(tmp_path / "kernel")])
    runpy.run_path(str(EXAMPLES / "self_distillation.py"), run_name="__main__")
    assert "collapse" in capsys.readouterr().out
    assert (tmp_path / "kernel" / "kernel_self_distillation.png").stat().st_size > 0


def test_label_noise_example_logs_sharpness_next_to_gradient_diagnostics(tmp_path, hub_env):
    """4 steps with noisy one-hot targets: the probes are logged every 2 steps, drawn and saved."""
    out = tmp_path / "run"
    run_example("label_noise.py", ["--max_steps", "4", "--probe_steps", "2", "--probes", "2", *SMOKE,
                                   "--output_dir", out], hub_env, tmp_path)
    logged = lambda metric: {entry["step"]: entry[metric] for entry in log_history(out)  # noqa: E731
                             if "loss" in entry and metric in entry}
    traces = logged("hf_regtools/diagnostics/hessian_trace")
    assert sorted(traces) == [2, 3, 4] and all(value != 0 for value in traces.values())
    assert sorted(logged("hf_regtools/diagnostics/gdv")) == [2, 3, 4]
    assert step_logs(out, "hf_regtools/label_noise/sigma") == {s: 1.0 for s in range(1, 5)}
    results = json.loads((out / "sharpness_results.json").read_text())
    assert results["eval_hessian_trace"] != 0 and "eval_hessian_top_eigenvalue" in results
    assert (out / "sharpness.png").read_bytes()[:4] == b"\x89PNG"


def test_large_lr_example_tabulates_and_draws_clean_and_patch_only_accuracy(tmp_path, hub_env):
    """2 epochs of each run on 256 images, the large LR annealed at epoch 2, noise in the small-LR run."""
    out = tmp_path / "run"
    proc = run_example("large_lr.py", ["--num_train_epochs", "2", "--anneal_epoch", "2", "--noise_std", "0.4", *SMOKE,
                                       "--output_dir", out], hub_env, tmp_path)
    assert "patch only" in proc.stdout
    results = json.loads((out / "large_lr_results.json").read_text())
    assert sorted(results) == ["large LR 0.1", "small LR 0.004"]
    assert all(len(history) == 2 for history in results.values())
    # logged after the update, like the Trainer's learning_rate: the factor of the next update
    assert step_logs(out / "large", "hf_regtools/large_lr/lr_factor") == {1: 1.0, 2: 0.04, 3: 0.04, 4: 0.04}
    assert sorted(set(step_logs(out / "small", "hf_regtools/large_lr/noise_level").values())) == pytest.approx([4e-6, 0.4])
    assert (out / "large_lr.png").read_bytes()[:4] == b"\x89PNG"
