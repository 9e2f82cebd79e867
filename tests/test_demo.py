import json
import math

from huggingface_hub import ModelCard

from hf_regtools._demo import run_demo


def test_demo_runs_offline_and_writes_its_outputs(tmp_path, capsys):
    runs = run_demo(output_dir=tmp_path, steps=10, teacher_steps=20)
    assert set(runs) == {"teacher (digits 0-4)", "weight selection", "random init", "random init + GradInit",
                         "weight selection + early dropout + alpha-SVRG"}
    for run in runs.values():
        assert run.losses and all(math.isfinite(loss) for _, loss in run.losses)
        assert 0.0 <= run.test_accuracy <= 1.0
    assert (tmp_path / "weight_selection_loss.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "runs" / "random_init_gradinit" / "gradinit_scales.json").read_text())
    assert report["objective_steps"] == 30 and report["scales"]
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.library_name == "transformers" and "weight-selection" in card.data.tags
    printed = capsys.readouterr().out
    assert "weight selection" in printed and "random init" in printed and "test accuracy" in printed


def test_demo_with_a_hub_teacher_resizes_the_digits(tmp_path, fake_hub):
    import uuid

    from hf_regtools.adapters import StudentShape, save_model
    from hf_regtools.hub import push_folder
    from hf_regtools.testing.tiny_models import transformers_vit

    repo_id = f"org/vit-teacher-{uuid.uuid4().hex[:8]}"
    save_model(transformers_vit(hidden_size=16, image_size=16, patch_size=4, num_channels=3, num_labels=7),
               tmp_path / "teacher")
    push_folder(tmp_path / "teacher", repo_id)
    runs = run_demo(teacher=repo_id, student=StudentShape(hidden_size=8, depth=2), output_dir=tmp_path / "out",
                    steps=4)
    assert set(runs) == {"weight selection", "random init", "random init + GradInit",
                         "weight selection + early dropout + alpha-SVRG"}
    card = ModelCard.load(tmp_path / "out" / "student" / "README.md")
    assert card.data.base_model == repo_id
