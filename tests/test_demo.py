import math

from huggingface_hub import ModelCard

from hf_regtools._demo import run_demo


def test_demo_runs_offline_and_writes_its_outputs(tmp_path, capsys):
    runs = run_demo(output_dir=tmp_path, steps=10, teacher_steps=20)
    assert set(runs) == {"teacher (digits 0-4)", "weight selection", "random init"}
    for run in runs.values():
        assert run.losses and all(math.isfinite(loss) for _, loss in run.losses)
        assert 0.0 <= run.test_accuracy <= 1.0
    assert (tmp_path / "weight_selection_loss.png").read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.library_name == "transformers" and "weight-selection" in card.data.tags
    printed = capsys.readouterr().out
    assert "weight selection" in printed and "random init" in printed and "test accuracy" in printed
