import weakref
from collections.abc import Mapping

import pytest
import torch

from hf_regtools._compat import transformers_model_key
from hf_regtools.adapters import UnsupportedModelError, detect_family, supported_families
from hf_regtools.testing.tiny_models import MODELS, STUDENTS, TEACHERS, timm_convnext, timm_vit, transformers_vit
from hf_regtools.weight_selection import WeightSelectionError, select_tensor, select_weights, uniform_indices

FAMILIES = sorted(TEACHERS)


@pytest.mark.parametrize("library, family", FAMILIES)
def test_every_family_selects_all_but_the_classifier(library, family):
    torch.manual_seed(0)
    teacher, student = TEACHERS[(library, family)](), STUDENTS[(library, family)]()
    assert detect_family(teacher).name == family and detect_family(student).name == family
    params_before = {name: id(p) for name, p in student.named_parameters()}
    report = select_weights(teacher, student)
    assert report.family == f"{library} {family}"
    classifier = {k for k in student.state_dict() if detect_family(student).is_classifier(k)}
    assert set(report.skipped) == classifier
    assert classifier or type(student).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # an LM head keeps the vocabulary
    assert set(report.loaded) == set(student.state_dict()) - classifier
    assert {name: id(p) for name, p in student.named_parameters()} == params_before
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    family_of = detect_family(teacher)
    sizes = family_of.factor_sizes(teacher.config) if family_of.factor_sizes else {}
    if library == "transformers":
        from hf_regtools._compat import transformers_checkpoint_key_map

        assert transformers_checkpoint_key_map(student, teacher_sd) == {k: k for k in student_sd if k in teacher_sd}
    for key in report.loaded:
        expected = teacher_sd[key]
        assert report.axes[key] is not None, f"{key}: no axis rule of {family} names it"
        for axis, (D, d) in enumerate(zip(expected.shape, student_sd[key].shape)):
            name = report.axes[key][axis]
            if name is None:
                assert D == d, key
            elif D != d:
                expected = expected.index_select(axis, _composed_index(report.index_sets, name, D, sizes))
        assert torch.equal(student_sd[key], expected), key


def _composed_index(index_sets, name: str, length: int, sizes: dict) -> torch.Tensor:
    """The indices of an axis `name` (`"c1"`, `"3*hidden"`, `"kv_heads0*group0*head_dim"`) from the report's
    per-factor sets and the teacher's factor lengths, composed here (outermost factor first)."""
    if name == "":
        return next(index for key, index in index_sets.items() if isinstance(key, tuple) and key[0] == length)
    factors = name.split("*")
    lengths = [int(f) if f.isdigit() else sizes.get(f.rstrip("0123456789.")) for f in factors]
    known = 1
    for value in lengths:
        known *= value or 1
    lengths = [value or length // known for value in lengths]
    index = torch.zeros(1, dtype=torch.long)
    for factor, size in zip(factors, lengths):
        chosen = torch.arange(size) if factor.isdigit() else index_sets[factor]
        index = (index[:, None] * size + chosen[None, :]).flatten()
    return index


def test_tiny_teachers_cover_exactly_the_supported_families():
    assert set(supported_families("weight_selection")) == {" ".join(key) for key in TEACHERS}


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_swin_raises_with_the_reason(library):
    swin, vit = MODELS[(library, "swin")], MODELS[(library, "vit")]
    with pytest.raises(UnsupportedModelError, match=f"does not support the student's family, {library} swin: Swin's "
                                                    "patch merging") as error:
        select_weights(swin(), swin(embed_dim=8))
    assert "swin" not in str(error.value).partition("Supported:")[2]
    with pytest.raises(UnsupportedModelError, match=f"the teacher's family, {library} swin"):
        select_weights(swin(), vit())


def test_consistency_timm_vit_patch_embedding():
    """Spec test 2: all embed axes use one index set; the student's patch embedding is the teacher's on it."""
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=8, depth=4, num_heads=2, img_size=32, patch_size=8)
    student = timm_vit(embed_dim=4, depth=2, num_heads=1, img_size=32, patch_size=8)
    report = select_weights(teacher, student)
    idx = uniform_indices(8, 4)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(student.patch_embed(x), teacher.patch_embed(x)[..., idx])
    t, s = teacher.state_dict(), student.state_dict()
    for key in ("cls_token", "pos_embed", "norm.weight", "blocks.1.norm1.bias", "blocks.0.attn.proj.bias",
                "blocks.0.mlp.fc2.bias"):
        assert torch.equal(s[key], t[key][..., idx]), key
    assert torch.equal(s["blocks.0.mlp.fc1.weight"], t["blocks.0.mlp.fc1.weight"][uniform_indices(32, 16)][:, idx])
    assert torch.equal(s["blocks.0.attn.proj.weight"], t["blocks.0.attn.proj.weight"][idx][:, idx])
    assert report.index_sets["hidden"].tolist() == idx.tolist()


def test_consistency_transformers_vit_and_classifier_never_copied():
    """Spec test 7: same invariants for ViTForImageClassification; `classifier.*` is never copied."""
    torch.manual_seed(0)
    teacher = transformers_vit(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                               num_labels=4)
    student = transformers_vit(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16,
                               num_labels=4)
    head_before = student.classifier.weight.detach().clone()
    report = select_weights(teacher, student)
    idx = uniform_indices(16, 8)
    x = torch.randn(2, 3, 16, 16)
    emb = lambda m: m.vit.embeddings.patch_embeddings(x)  # noqa: E731
    assert torch.equal(emb(student), emb(teacher)[..., idx])
    assert torch.equal(student.classifier.weight, head_before)
    assert "classifier.weight" in report.skipped
    t, s = teacher.state_dict(), student.state_dict()
    q = transformers_model_key(student, "vit.encoder.layer.1.attention.attention.query.weight")  # 5.x: q_proj
    assert torch.equal(s[q], t[q][idx][:, idx])


def test_layer_selection_first_n_isotropic():
    torch.manual_seed(0)
    teacher, student = timm_vit(depth=4), timm_vit(embed_dim=8, depth=2, num_heads=1)
    select_weights(teacher, student)
    idx = uniform_indices(16, 8)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["blocks.1.attn.proj.weight"], t["blocks.1.attn.proj.weight"][idx][:, idx])
    assert not torch.equal(s["blocks.1.attn.proj.weight"], t["blocks.3.attn.proj.weight"][idx][:, idx])


def test_layer_selection_first_n_per_stage_convnext():
    """Spec test 3: depths (3,3,9,3) -> (2,2,6,2): student stages.2.blocks.5 <- teacher stages.2.blocks.5."""
    torch.manual_seed(0)
    teacher = timm_convnext(dims=(8, 16, 32, 64), depths=(3, 3, 9, 3))
    student = timm_convnext(dims=(4, 8, 16, 32), depths=(2, 2, 6, 2))
    for module in teacher.modules():
        if hasattr(module, "gamma") and module.gamma is not None:
            torch.nn.init.normal_(module.gamma)
    reader = RecordingMapping(teacher.state_dict())
    select_weights(reader, student)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["stages.2.blocks.5.gamma"], t["stages.2.blocks.5.gamma"][uniform_indices(32, 16)])
    assert not any(k.startswith(("stages.2.blocks.6.", "stages.0.blocks.2.")) for k in reader.reads)


def test_head_handling_default_and_official_timm_convnext():
    """Spec test 4: default transfers head.norm; skip='official' leaves it at init (weight 1, bias 0)."""
    torch.manual_seed(0)
    teacher, make_student = timm_convnext(), lambda: timm_convnext(dims=(4, 8, 16, 32), depths=(1, 1, 2, 1))
    torch.nn.init.normal_(teacher.head.norm.weight)
    student = make_student()
    select_weights(teacher, student)
    assert torch.equal(student.head.norm.weight, teacher.head.norm.weight[uniform_indices(64, 32)])
    official = make_student()
    report = select_weights(teacher, official, skip="official")
    assert torch.equal(official.head.norm.weight, torch.ones(32)) and torch.equal(official.head.norm.bias, torch.zeros(32))
    assert {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"} <= set(report.skipped)


def test_keep_classifier_when_label_spaces_match():
    torch.manual_seed(0)
    teacher, student = timm_vit(num_classes=5), timm_vit(embed_dim=8, depth=2, num_heads=1, num_classes=5)
    select_weights(teacher, student, keep_classifier=True)
    assert torch.equal(student.head.weight, teacher.head.weight[:, uniform_indices(16, 8)])
    assert torch.equal(student.head.bias, teacher.head.bias)
    with pytest.raises(WeightSelectionError, match="label spaces differ"):
        select_weights(teacher, timm_vit(embed_dim=8, depth=2, num_heads=1, num_classes=3), keep_classifier=True)


def test_deit_distillation_head_is_a_classifier_not_a_substring_accident():
    torch.manual_seed(0)
    teacher, student = TEACHERS[("timm", "deit")](), STUDENTS[("timm", "deit")]()
    report = select_weights(teacher, student)
    assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} == set(report.skipped)
    assert "dist_token" in report.loaded


def test_qkv_modes():
    """Spec test 5: integer ratio: per_chunk == fused; 384 -> 320: they differ and per_chunk follows the embed set."""
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=16, depth=1, num_heads=2)
    a, b = timm_vit(embed_dim=8, depth=1, num_heads=1), timm_vit(embed_dim=8, depth=1, num_heads=1)
    select_weights(teacher, a)
    select_weights(teacher, b, qkv_mode="fused")
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)

    qkv = torch.randn(1152, 384)
    embed = uniform_indices(384, 320)
    pc = select_tensor(qkv, (960, 320), qkv_chunks=3)
    fu = select_tensor(qkv, (960, 320))
    assert not torch.equal(pc, fu)
    for chunk in range(3):
        rows = pc[chunk * 320:(chunk + 1) * 320]
        assert torch.equal(rows, qkv[embed + chunk * 384][:, embed])
    fused_rows = uniform_indices(1152, 960)
    mismatches = [int((fused_rows[c * 320:(c + 1) * 320] - c * 384 != embed).sum()) for c in range(3)]
    assert mismatches == [32, 0, 32]  # the spec's worked example: q and v differ in 32 of 320 rows, k matches


@pytest.mark.parametrize("teacher_dim, student_dim, differing", [
    (384, 320, [32, 0, 32]), (768, 320, [151, 74, 151]), (512, 320, [64, 20, 64]), (384, 256, [0, 0, 0])])
def test_official_fused_qkv_rows_leave_the_embedding_index_set(teacher_dim, student_dim, differing):
    """The method card's numbers: rows of q, k and v that the official fused rule takes outside the embedding's
    index set (k too, at most non-integer ratios; none at 3:2), computed with a copy of the official rule."""
    from .test_indices import official_uniform_indices

    fused = official_uniform_indices(3 * teacher_dim, 3 * student_dim)
    embed = official_uniform_indices(teacher_dim, student_dim)
    assert torch.equal(uniform_indices(3 * teacher_dim, 3 * student_dim), fused)
    chunks = [fused[c * student_dim:(c + 1) * student_dim] - c * teacher_dim for c in range(3)]
    assert [int((chunk != embed).sum()) for chunk in chunks] == differing
    qkv = torch.randn(3 * teacher_dim, 4)
    per_chunk = select_tensor(qkv, (3 * student_dim, 4), qkv_chunks=3)
    assert torch.equal(per_chunk, torch.cat([qkv[embed + c * teacher_dim] for c in range(3)]))


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    """Issue 7: selection was silent. The bar goes to stderr, and not into captured output unless asked."""
    import sys

    torch.manual_seed(0)
    teacher = timm_vit()
    select_weights(teacher, timm_vit(embed_dim=8, depth=2, num_heads=1), progress=True)
    captured = capsys.readouterr()
    assert "weight selection" in captured.err and "tensor" in captured.err and captured.out == ""
    select_weights(teacher, timm_vit(embed_dim=8, depth=2, num_heads=1))
    assert capsys.readouterr().err == ""  # not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    select_weights(teacher, timm_vit(embed_dim=8, depth=2, num_heads=1))
    assert capsys.readouterr().err == ""  # a terminal, but HF_HUB_DISABLE_PROGRESS_BARS=1 (tests/conftest.py)


def test_state_dicts_in_and_out():
    torch.manual_seed(0)
    teacher = timm_vit()
    student_sd = timm_vit(embed_dim=8, depth=2, num_heads=1).state_dict()
    report = select_weights(teacher.state_dict(), student_sd)
    assert torch.equal(student_sd["norm.weight"], teacher.norm.weight[uniform_indices(16, 8)])
    assert len(report.loaded) == len(student_sd) - 2


def test_modes_keep_consistency():
    torch.manual_seed(0)
    teacher = timm_vit(embed_dim=16)
    for mode in ("consecutive", "random"):
        student = timm_vit(embed_dim=8, depth=2, num_heads=1)
        report = select_weights(teacher, student, mode=mode, seed=1)
        idx = report.index_sets["hidden"]
        x = torch.randn(1, 3, 16, 16)
        assert torch.equal(student.patch_embed(x), teacher.patch_embed(x)[..., idx])
        assert torch.equal(student.norm.weight, teacher.norm.weight[idx])
    assert report.index_sets["hidden"].tolist() != list(range(8))


def test_reshape_1x1_for_timm_convnext_conv_mlp():
    torch.manual_seed(0)
    teacher = timm_convnext(conv_mlp=False)
    student = timm_convnext(dims=(4, 8, 16, 32), depths=(1, 1, 2, 1), conv_mlp=True)
    with pytest.raises(WeightSelectionError, match="reshape_1x1=True"):
        select_weights(teacher, student)
    select_weights(teacher, student, reshape_1x1=True)
    w_t, w_s = teacher.stages[0].blocks[0].mlp.fc1.weight, student.stages[0].blocks[0].mlp.fc1.weight
    assert w_s.shape == (16, 4, 1, 1)
    assert torch.equal(w_s[:, :, 0, 0], w_t[uniform_indices(32, 16)][:, uniform_indices(8, 4)])


def test_error_paths():
    torch.manual_seed(0)
    with pytest.raises(WeightSelectionError, match=r"the student has 4 blocks, the teacher 2"):
        select_weights(timm_vit(depth=2), timm_vit(embed_dim=8, depth=4, num_heads=1))
    with pytest.raises(WeightSelectionError, match="larger than the teacher"):
        select_weights(timm_vit(embed_dim=8, num_heads=1), timm_vit(embed_dim=16))
    with pytest.raises(UnsupportedModelError, match="timm model but the student a transformers"):
        select_weights(timm_vit(), transformers_vit(hidden_size=8, num_attention_heads=1, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match="different families"):
        select_weights(timm_vit(), timm_convnext(dims=(4, 8, 16, 32), depths=(1, 1, 2, 1)))
    with pytest.raises(UnsupportedModelError, match="Supported: timm vit"):
        select_weights(torch.nn.Linear(4, 4), torch.nn.Linear(2, 2))
    with pytest.raises(WeightSelectionError, match="axis 1 must be equal"):
        select_weights(timm_vit(img_size=16), timm_vit(embed_dim=8, num_heads=1, img_size=8))
    with pytest.raises(WeightSelectionError, match="unknown qkv_mode"):
        select_weights(timm_vit(), timm_vit(), qkv_mode="stacked")
    with pytest.raises(WeightSelectionError, match="unknown skip rule"):
        select_weights(timm_vit(), timm_vit(), skip="heads")


def test_teacher_is_read_one_tensor_at_a_time():
    torch.manual_seed(0)
    reader = RecordingMapping(timm_vit(depth=4).state_dict(), check_released=True)
    select_weights(reader, timm_vit(embed_dim=8, depth=2, num_heads=1))
    assert reader.reads and not any(k.startswith(("blocks.2.", "blocks.3.")) for k in reader.reads)
    assert reader.max_alive == 1


class RecordingMapping(Mapping):
    """A teacher state dict that records reads and hands out copies, tracking how many are alive at once."""

    def __init__(self, tensors, check_released=False):
        self.tensors, self.reads, self.alive, self.max_alive = tensors, [], [], 0
        self.check_released = check_released

    def __getitem__(self, key):
        self.reads.append(key)
        tensor = self.tensors[key].clone()
        self.alive = [ref for ref in self.alive if ref() is not None]
        self.alive.append(weakref.ref(tensor))
        self.max_alive = max(self.max_alive, len(self.alive))
        return tensor

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)
