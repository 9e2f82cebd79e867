"""What WEISSI claims to bound: the input gradient of the network, and the product-of-norms bound on it.

For a chain of layers with 1-Lipschitz positively homogeneous activations (ReLU; non-overlapping max pooling; global
average pooling), `||grad_x f(x)|| <= prod_l c_l ||W_l||_2 <= prod_l c_l ||W_l||_F` for every output `f` of the
network (a logit), at every input; a residual block `y = s(x) + F(x)` contributes the factor
`c_s ||W_s|| + prod_{l in F} c_l ||W_l||` (`1 + ...` for the identity). `c_l = 1` for a linear layer; a convolution,
whose weight is read as an `out x (in * kernel)` matrix, has `c_l = sqrt(n_h * n_w)` with `n = ceil(kernel / stride)`
(`kernel` with dilation): the number of output positions an input pixel reaches. Watching both during training:

```py
structure = WeissiRegularizer(model, lambda1=1e-3, lambda2=0.0).structure
grads = input_gradient_norm(model, pixel_values, labels)          # per example
bound = product_of_norms_bound(model, structure, norm="spectral")
```
"""

from __future__ import annotations

import math

import torch

from .core import NORMS, WeissiStructure, _as_matrix, find_weissi_structure

OUTPUTS = ("logit", "loss")


def _logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if type(model).__module__.startswith("transformers."):
        outputs = model(pixel_values=inputs)
    else:
        outputs = model(inputs)
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(f"{type(model).__name__} returned {type(outputs).__name__} without `logits`; pass a model "
                        "returning a tensor, a dict with 'logits' or a ModelOutput")
    return logits


def input_gradient_norm(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, *,
                        output: str = "logit") -> torch.Tensor:
    """Per-example `||grad_x f(x)||_2` of `model` on a batch (no parameter gradients). The model runs as it is: call
    `model.eval()` first for BatchNorm (a training-mode forward updates its running statistics) and dropout.

    Args:
        model (`nn.Module`): a module taking `inputs` (transformers models get `pixel_values=inputs`) and returning
            logits (a tensor, a dict with `"logits"`, or a `ModelOutput`).
        inputs (`torch.Tensor`): a batch, first axis the examples.
        labels (`torch.Tensor`, *optional*): the classes; without them, the predicted classes.
        output (`str`, *optional*, defaults to `"logit"`): `"logit"`: the gradient of the logit of the class (what
            `product_of_norms_bound` bounds; a scalar-output model's own output); `"loss"`: of the example's
            cross-entropy (at most `sqrt(2)` times the Jacobian's norm).

    Returns:
        `torch.Tensor`: shape `(batch,)`, the dtype of `inputs`.
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
    inputs = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = _logits(model, inputs)
        if logits.dim() == 1 or logits.shape[-1] == 1:
            if output == "loss":
                raise ValueError("output='loss' needs class logits; this model has one output")
            chosen = logits.reshape(logits.shape[0])
        else:
            targets = logits.argmax(-1) if labels is None else labels.to(logits.device)
            if output == "logit":
                chosen = logits.gather(-1, targets[:, None]).squeeze(-1)
            else:
                chosen = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        (gradient,) = torch.autograd.grad(chosen.sum(), inputs)
    return gradient.flatten(1).norm(dim=1)


def conv_factor(module: torch.nn.Module) -> float:
    """`c_l` of the module docstring: 1 for a linear layer, `sqrt(prod ceil(kernel_eff / stride))` for a convolution
    (at most `kernel_eff` positions per axis, `kernel_eff = dilation * (kernel - 1) + 1`, but never more than
    `kernel`)."""
    if isinstance(module, torch.nn.Linear):
        return 1.0
    count = 1
    for kernel, stride, dilation in zip(module.kernel_size, module.stride, module.dilation):
        reach = math.ceil((dilation * (kernel - 1) + 1) / stride)
        count *= min(kernel, reach)
    return math.sqrt(count)


def product_of_norms_bound(model: torch.nn.Module, structure: WeissiStructure | None = None, *,
                           norm: str = "spectral") -> torch.Tensor:
    """The product-of-norms bound on `||grad_x f(x)||` of the module docstring, as an fp32 scalar (no gradient).

    Args:
        model (`nn.Module`): the model.
        structure (`WeissiStructure`, *optional*): chain layers and residual blocks (`find_weissi_structure(model,
            bn="include")` when not given: the bound needs every layer).
        norm (`str`, *optional*, defaults to `"spectral"`): `"spectral"` (exact `torch.linalg.matrix_norm(ord=2)`)
            or `"fro"` (larger).

    The bound holds for networks whose only non-linear parts are 1-Lipschitz positively homogeneous activations and
    pooling; BatchNorm in training mode, overlapping max pooling (a ResNet stem's 3x3 stride-2 pool: factor up to 2)
    and attention are outside it.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if structure is None:
        structure = find_weissi_structure(model, bn="include")
    modules = dict(model.named_modules())
    with torch.no_grad():
        def scaled(name: str) -> torch.Tensor:
            matrix = _as_matrix(modules[name].weight)
            value = torch.linalg.matrix_norm(matrix, ord=2) if norm == "spectral" else matrix.norm()
            return value * conv_factor(modules[name])

        bound = torch.ones((), dtype=torch.float32)
        for name in structure.chain:
            bound = bound * scaled(name).cpu()
        for block in structure.blocks:
            branch = torch.ones((), dtype=torch.float32)
            for name in block.branch:
                branch = branch * scaled(name).cpu()
            shortcut = scaled(block.shortcut).cpu() if block.shortcut else torch.ones((), dtype=torch.float32)
            bound = bound * (shortcut + branch)
    return bound
