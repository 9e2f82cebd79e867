"""Batch-statistics BatchNorm with a cheap double backward, for the second-order passes of GradInit and NIO.

PyTorch differentiates `native_batch_norm_backward` with a general formula of about forty full-size elementwise
operations per layer; in a GradInit constraint iteration on a BN ResNet that double backward takes about a third of
the time. `batch_norm_double_backward_mode()` routes `F.batch_norm` calls in batch-statistics mode without running
statistics (what `_gradinit_mode` makes of every BatchNorm) to `_BatchNormTrain`: the same forward kernel and the
same first backward kernel (outputs and first-order gradients are bit-for-bit those of `F.batch_norm`), and a double
backward written as two fused reductions and a few per-channel affine passes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def _channel_view(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.view((1, -1) + (1,) * (dim - 2))


class _BatchNormTrain(torch.autograd.Function):
    """`F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)`, differentiated by `_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        output, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = _BatchNormBackward.apply(grad_output, input, weight, mean, invstd,
                                                                      ctx.eps, mask)
        return grad_input, grad_weight, grad_bias, None


class _BatchNormBackward(torch.autograd.Function):
    """BatchNorm's training-mode backward (PyTorch's kernel) with a hand-derived backward of its own.

    Per channel, with n values, r = invstd, x^ = (x - mean) r, gamma = weight (1 without):
    grad_input = gamma r (g - mean(g) - x^ mean(g x^)), grad_weight = sum(g x^), grad_bias = sum(g). For cotangents
    (u, a, b) of those three outputs, with P = sum(g x^), Q = sum(u x^), S = sum(u g) and the means g_, u_:

    - d/dg = gamma r (u - u_ - x^ Q / n) + a x^ + b;
    - d/dgamma = r (S - n u_ g_ - P Q / n);
    - d/dx = r alpha g + r beta u + c x^ - r (alpha g_ + beta u_), with alpha = a - gamma r Q / n,
      beta = -gamma r P / n and c = -gamma r^2 (S - n u_ g_ - P Q / n) / n - r (alpha P + beta Q) / n.
    """

    @staticmethod
    def forward(ctx, grad_output, input, weight, mean, invstd, eps, mask):
        grads = _native_batch_norm_backward(grad_output, input, weight, None, None, mean, invstd, True, eps, mask)
        ctx.save_for_backward(grad_output, input, weight, mean, invstd)
        ctx.eps = eps
        return grads

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
        grad_output, input, weight, mean, invstd = ctx.saved_tensors
        needs_grad_output, needs_input, needs_weight = ctx.needs_input_grad[:3]
        dim, count = input.dim(), input.numel() // input.shape[1]
        r = invstd
        gamma = torch.ones_like(r) if weight is None else weight
        zeros = torch.zeros_like(r)
        a = zeros if grad_grad_weight is None else grad_grad_weight
        b = zeros if grad_grad_bias is None else grad_grad_bias
        _, sum_g_xhat, sum_g = _native_batch_norm_backward(grad_output, input, None, None, None, mean, invstd, True,
                                                           ctx.eps, [False, True, True])
        u = grad_grad_input
        if u is not None:
            _, sum_u_xhat, sum_u = _native_batch_norm_backward(u, input, None, None, None, mean, invstd, True,
                                                               ctx.eps, [False, True, True])
            sum_u_g = (u * grad_output).sum([0, *range(2, dim)])
        else:
            sum_u_xhat = sum_u = sum_u_g = zeros
        mean_g, mean_u = sum_g / count, sum_u / count
        curvature = sum_u_g - count * mean_u * mean_g - sum_g_xhat * sum_u_xhat / count
        xhat = (input - _channel_view(mean, dim)) * _channel_view(r, dim)
        gamma_r = gamma * r
        alpha = a - gamma_r * sum_u_xhat / count
        grad_grad_output = grad_input = grad_weight = None
        if needs_grad_output:
            grad_grad_output = torch.addcmul(_channel_view(b - gamma_r * mean_u, dim), xhat, _channel_view(alpha, dim))
            if u is not None:
                grad_grad_output.addcmul_(u, _channel_view(gamma_r, dim))
        if needs_input:
            beta = -gamma_r * sum_g_xhat / count
            xhat_coefficient = -gamma_r * curvature * r / count - r * (alpha * sum_g_xhat + beta * sum_u_xhat) / count
            constant = -r * (alpha * mean_g + beta * mean_u)
            grad_input = torch.addcmul(_channel_view(constant, dim), xhat, _channel_view(xhat_coefficient, dim))
            grad_input.addcmul_(grad_output, _channel_view(r * alpha, dim))
            if u is not None:
                grad_input.addcmul_(u, _channel_view(r * beta, dim))
        if needs_weight:
            grad_weight = r * curvature
        return grad_grad_output, grad_input, grad_weight, None, None, None, None


def _batch_norm_arguments(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                          eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, eps


class _BatchNormDoubleBackwardMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            input, running_mean, running_var, weight, bias, training, eps = _batch_norm_arguments(*args, **kwargs)
            if (training and running_mean is None and running_var is None and torch.is_grad_enabled()
                    and input.dim() >= 2 and input.numel() // max(input.shape[1], 1) > 1):
                return _BatchNormTrain.apply(input, weight, bias, eps)
        return func(*args, **kwargs)


@contextmanager
def batch_norm_double_backward_mode(enabled: bool = True):
    """Within the context, batch-statistics `F.batch_norm` calls without running statistics use `_BatchNormTrain`
    (same outputs and first-order gradients, a faster double backward); other calls are unchanged."""
    if not enabled:
        yield
        return
    with _BatchNormDoubleBackwardMode():
        yield
