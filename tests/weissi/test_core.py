"""WEISSI's penalty: invariance to weight scale shifts (MLP, residual MLP, ResNets), exact gradients, the discovered
structure per family, the input-gradient bound, errors (spec weissi.md §7)."""

import pytest
import torch

from hf_regtools.testing.tiny_models import (mlp_classifier, timm_resnet, timm_resnet_classifier, timm_vit,
                                             transformers_resnet)
from hf_regtools.weissi import (ResidualBlock, WeissiConfig, WeissiRegularizer, find_weissi_structure,
                                input_gradient_norm, product_of_norms_bound, weissi_param_groups, weissi_penalty)


def plain_mlp(sizes=(6, 16, 12, 10, 1), bias=False):
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b, bias=bias), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class ResidualMLP(torch.nn.Module):
    """stem -> blocks x + fc2(relu(fc1(x))) (identity shortcut) -> head; bias-free, ReLU."""

    def __init__(self, width=8, blocks=3, inputs=5, outputs=1):
        super().__init__()
        self.stem = torch.nn.Linear(inputs, width, bias=False)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"fc1": torch.nn.Linear(width, 2 * width, bias=False),
                                                               "fc2": torch.nn.Linear(2 * width, width, bias=False)})
                                          for _ in range(blocks))
        self.head = torch.nn.Linear(width, outputs, bias=False)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block["fc2"](torch.relu(block["fc1"](x))))
        return self.head(x)

    def residual_blocks(self):
        return [[f"blocks.{i}.fc1", f"blocks.{i}.fc2"] for i in range(len(self.blocks))]


def l2(model):
    return sum(p.pow(2).sum() for p in model.parameters())


def scale_(module, factor):
    with torch.no_grad():
        module.weight.mul_(factor)


LAMBDAS = dict(lambda1=0.7, lambda2=0.3)


def test_mlp_penalty_is_invariant_to_random_scale_shifts_and_l2_is_not():
    # §7.1: bias-free 4-layer ReLU MLP, random gammas with product 1
    torch.manual_seed(0)
    model = plain_mlp().double()
    x = torch.randn(32, 6, dtype=torch.float64)
    before, outputs, norm2 = weissi_penalty(model, **LAMBDAS), model(x), l2(model)
    gammas = torch.rand(4, dtype=torch.float64) * 3 + 0.2
    gammas[-1] = 1 / gammas[:-1].prod()
    for layer, gamma in zip(model[::2], gammas):
        scale_(layer, gamma)
    torch.testing.assert_close(weissi_penalty(model, **LAMBDAS), before, rtol=1e-6, atol=0)
    torch.testing.assert_close(model(x), outputs, rtol=1e-6, atol=1e-6)
    assert abs(l2(model) - norm2) / norm2 > 0.05


@pytest.mark.parametrize("c", [0.1, 2.0, 37.0])
def test_mlp_one_layer_times_c_next_over_c(c):
    torch.manual_seed(1)
    model = mlp_classifier(depth=4)
    before, norm2 = weissi_penalty(model, **LAMBDAS), l2(model)
    scale_(model.layers[1], c)
    scale_(model.layers[2], 1 / c)
    torch.testing.assert_close(weissi_penalty(model, **LAMBDAS), before, rtol=1e-6, atol=0)
    assert not torch.isclose(l2(model), norm2, rtol=1e-3)


def test_with_biases_the_cumulative_rule_keeps_outputs_and_penalty():
    torch.manual_seed(2)
    model = plain_mlp(bias=True).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    before, outputs = weissi_penalty(model, **LAMBDAS), model(x)
    gammas = [2.0, 0.25, 4.0, 0.5]
    cumulative = 1.0
    with torch.no_grad():
        for layer, gamma in zip(model[::2], gammas):
            cumulative *= gamma
            layer.weight.mul_(gamma)
            layer.bias.mul_(cumulative)
    torch.testing.assert_close(model(x), outputs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weissi_penalty(model, **LAMBDAS), before, rtol=1e-6, atol=0)


def test_residual_mlp_is_invariant_inside_a_branch_and_between_stem_and_head():
    torch.manual_seed(3)
    model = ResidualMLP().double()
    x = torch.randn(20, 5, dtype=torch.float64)
    penalty = lambda: weissi_penalty(model, residual_blocks=model.residual_blocks(), **LAMBDAS)  # noqa: E731
    before, outputs, norm2 = penalty(), model(x), l2(model)
    scale_(model.blocks[1]["fc1"], 5.0)
    scale_(model.blocks[1]["fc2"], 1 / 5.0)
    scale_(model.stem, 0.3)
    scale_(model.head, 1 / 0.3)
    torch.testing.assert_close(model(x), outputs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(penalty(), before, rtol=1e-6, atol=0)
    assert abs(l2(model) - norm2) / norm2 > 0.05
    # the residual form is what makes it invariant: a plain chain over the same layers changes
    structure = find_weissi_structure(model, residual_blocks=model.residual_blocks())
    assert structure.chain == ("stem", "head") and len(structure.blocks) == 3
    scale_(model.blocks[0]["fc1"], 3.0)
    assert not torch.isclose(penalty(), before, rtol=1e-3)


@pytest.mark.parametrize("builder", [timm_resnet_classifier, transformers_resnet], ids=["timm", "transformers"])
def test_resnet_blocks_are_found_and_the_penalty_is_invariant_inside_them(builder):
    torch.manual_seed(4)
    model = builder()
    regularizer = WeissiRegularizer(model, bn="include", **LAMBDAS)
    structure = regularizer.structure
    assert len(structure.blocks) == 4 and len(structure.chain) == 2  # stem and classifier
    assert [block.shortcut is None for block in structure.blocks] == (
        [False, False, False, False] if builder is timm_resnet_classifier else [True, False, False, False])
    modules = dict(model.named_modules())
    before = regularizer().detach()
    block = structure.blocks[2]
    scale_(modules[block.branch[0]], 4.0)
    scale_(modules[block.branch[1]], 0.25)
    torch.testing.assert_close(regularizer(), before, rtol=1e-6, atol=0)
    scale_(modules[block.shortcut], 2.0)  # the shortcut is no shift: the penalty changes
    assert not torch.isclose(regularizer(), before, rtol=1e-4)


def test_bottleneck_blocks_have_three_branch_layers():
    structure = find_weissi_structure(timm_resnet(bottleneck=True), bn="include")
    assert [len(block.branch) for block in structure.blocks] == [3, 3, 3, 3]
    structure = find_weissi_structure(transformers_resnet(layer_type="bottleneck"), bn="include")
    assert [len(block.branch) for block in structure.blocks] == [3, 3, 3, 3]


def test_batchnorm_fed_weights_are_excluded_by_default():
    structure = find_weissi_structure(timm_resnet_classifier())
    assert structure == find_weissi_structure(timm_resnet_classifier(), layers=["backbone.fc"])
    assert structure.chain == ("backbone.fc",) and not structure.blocks
    assert find_weissi_structure(transformers_resnet()).chain == ("classifier.1",)
    assert find_weissi_structure(mlp_classifier(), include_classifier=False).chain == ("layers.0", "layers.1")


def test_log_norm_gradient_is_w_over_norm_squared():
    # §7.3
    torch.manual_seed(5)
    layer = torch.nn.Linear(7, 5, bias=False).double()
    model = torch.nn.Sequential(layer)
    weissi_penalty(model, lambda1=1.0, lambda2=0.0).backward()
    weight = layer.weight.detach()
    torch.testing.assert_close(layer.weight.grad, weight / weight.norm() ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("residual", [False, True])
def test_gradient_matches_finite_differences(residual):
    torch.manual_seed(6)
    model = (ResidualMLP() if residual else plain_mlp()).double()
    blocks = model.residual_blocks() if residual else None
    for _, parameter in model.named_parameters():  # shortcut weights and every layer, away from L1 kinks
        with torch.no_grad():
            parameter.add_(0.05 * parameter.sign())
    if residual:
        blocks[0] = {"branch": blocks[0], "shortcut": "stem"}  # a projection "shortcut" (any weight layer will do)
        layers = ["head"]
    else:
        layers = None
    regularizer = WeissiRegularizer(model, residual_blocks=blocks, layers=layers, **LAMBDAS)
    regularizer().backward()
    weights = regularizer.weights
    gradients = [w.grad.clone() for w in weights]
    for trial in range(3):
        directions = [torch.randn_like(w) for w in weights]
        eps = 1e-6
        with torch.no_grad():
            for w, d in zip(weights, directions):
                w.add_(eps * d)
            plus = regularizer().item()
            for w, d in zip(weights, directions):
                w.sub_(2 * eps * d)
            minus = regularizer().item()
            for w, d in zip(weights, directions):
                w.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(gradients, directions)).item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (trial, numeric, analytic)


def test_spectral_power_iteration_converges():
    # §7.3: within 1e-3 of torch.linalg.matrix_norm(W, 2) after 50 iterations (one per call, vectors kept)
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    regularizer = WeissiRegularizer(model, norm="spectral", layers=["0", "3"], lambda1=1.0, lambda2=0.0)
    for _ in range(50):
        norms = regularizer.layer_norms()
    exact = torch.stack([torch.linalg.matrix_norm(model[0].weight.flatten(1), 2),
                         torch.linalg.matrix_norm(model[3].weight, 2)])
    torch.testing.assert_close(norms, exact, atol=1e-3, rtol=0)
    assert set(regularizer.state) == {"0", "3"}
    once = WeissiRegularizer(model, norm="spectral", layers=["0", "3"], lambda1=1.0, lambda2=0.0,
                             power_iterations=50).layer_norms()
    torch.testing.assert_close(once, exact, atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm", ["fro", "spectral"])
def test_directional_term_is_scale_free(norm):
    # §7.5
    torch.manual_seed(8)
    model = mlp_classifier()
    regularizer = WeissiRegularizer(model, norm=norm, lambda1=0.0, lambda2=1.0, power_iterations=200)
    regularizer.terms()
    before = regularizer.terms()["l1_direction"].detach()
    scale_(model.layers[0], 9.0)
    torch.testing.assert_close(regularizer.terms()["l1_direction"], before, rtol=1e-5, atol=0)


def test_terms_add_up_and_are_fp32_for_half_weights():
    torch.manual_seed(9)
    model = mlp_classifier().to(torch.bfloat16)
    terms = WeissiRegularizer(model, **LAMBDAS).terms()
    assert all(value.dtype == torch.float32 for value in terms.values())
    torch.testing.assert_close(terms["penalty"], 0.7 * terms["log_norm_sum"] + 0.3 * terms["l1_direction"])
    reference = model.float()
    expected = sum(layer.weight.norm().log() for layer in reference.layers)
    torch.testing.assert_close(terms["log_norm_sum"], expected, rtol=1e-5, atol=1e-5)


def test_input_gradient_is_below_the_bound_on_random_data():
    # §7.2: 100 random inputs of a scalar-output MLP, and of a 3-block residual MLP
    torch.manual_seed(10)
    model = plain_mlp()
    x = torch.randn(100, 6) * 3
    gradients = input_gradient_norm(model, x)
    spectral, frobenius = product_of_norms_bound(model), product_of_norms_bound(model, norm="fro")
    assert gradients.shape == (100,) and (gradients > 0).any()
    assert gradients.max() <= spectral * (1 + 1e-5) and spectral <= frobenius
    residual = ResidualMLP()
    structure = find_weissi_structure(residual, residual_blocks=residual.residual_blocks())
    gradients = input_gradient_norm(residual, torch.randn(100, 5) * 3)
    spectral = product_of_norms_bound(residual, structure)
    assert gradients.max() <= spectral * (1 + 1e-5) <= product_of_norms_bound(residual, structure, norm="fro") * 1.01


def test_the_bound_covers_strided_convolutions_and_class_logits():
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 6, 3, padding=1, bias=False), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5, bias=False))
    x = torch.randn(50, 2, 8, 8)
    labels = torch.randint(0, 5, (50,))
    bound = product_of_norms_bound(model)
    assert input_gradient_norm(model, x, labels).max() <= bound
    assert input_gradient_norm(model, x, labels, output="loss").max() <= 2 ** 0.5 * bound
    # the convolutions' factors are needed: the kernels' own spectral norms do not bound a convolution
    kernel_only = torch.stack([torch.linalg.matrix_norm(m.weight.flatten(1), 2) for m in model if hasattr(m, "weight")])
    assert kernel_only.prod() < bound


def test_param_groups_take_the_managed_weights_out_of_weight_decay():
    model = timm_resnet_classifier()
    regularizer = WeissiRegularizer(model, bn="include", **LAMBDAS)
    groups = weissi_param_groups(model, 5e-4, regularizer=regularizer)
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == set() and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    groups = weissi_param_groups(model, 5e-4)  # bn="exclude": only the classifier is managed; convolutions decay
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(model.backbone.fc.weight) not in decayed and id(model.backbone.conv1.weight) in decayed


def test_errors_name_the_problem():
    model = mlp_classifier()
    with pytest.raises(ValueError, match="unknown norm 'nuclear'"):
        weissi_penalty(model, lambda1=1.0, lambda2=0.0, norm="nuclear")
    with pytest.raises(ValueError, match="lambda1 must be a non-negative number"):
        weissi_penalty(model, lambda1=-1.0, lambda2=0.0)
    with pytest.raises(ValueError, match=r"no module named 'layer.0'.*did you mean"):
        weissi_penalty(model, lambda1=1.0, lambda2=0.0, layers=["layer.0"])
    with pytest.raises(ValueError, match="'layers' is a ModuleList"):
        weissi_penalty(model, lambda1=1.0, lambda2=0.0, layers=["layers"])
    with pytest.raises(ValueError, match="listed twice"):
        weissi_penalty(model, lambda1=1.0, lambda2=0.0, layers=["layers.0"], residual_blocks=[["layers.0"]])
    with pytest.raises(ValueError, match="each entry is a list of the branch's module names"):
        weissi_penalty(model, lambda1=1.0, lambda2=0.0, residual_blocks=["layers.0"])
    with pytest.raises(ValueError, match="unknown bn"):
        find_weissi_structure(model, bn="fold")
    with pytest.raises(ValueError, match="not positively homogeneous.*LayerNorm"):
        find_weissi_structure(timm_vit())
    with pytest.raises(ValueError, match="no layer to regularize.*bn='include'"):
        find_weissi_structure(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="unknown settings \\['lambda'\\]"):
        WeissiConfig.from_value({"lambda": 1.0, "lambda1": 1.0, "lambda2": 0.0})
    with pytest.raises(ValueError, match="unknown schedule kind"):
        WeissiConfig(lambda1=1.0, lambda2=0.0, schedule="step")
    assert find_weissi_structure(timm_vit(), layers=["head"]).chain == ("head",)
    assert ResidualBlock(("a",), "b").layers == ("a", "b")
