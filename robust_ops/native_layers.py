"""Run a model's standard layers on faster CPU code with bitwise-identical results, while a ``with`` block lasts.

``native_layers(model)`` gives, per module instance and only while active:

* ``nn.MaxPool2d`` (exact type) -> :func:`robust_ops.functional.max_pool2d`: ATen's selection rule on the drop-max
  kernel's vectorized windows. ATen's NCHW CPU max pooling walks every window element by element; at resnet18's
  first pooling layer (1x64x64, batch 32) the forward is ~8x faster here. Outputs, indices and gradients are
  bitwise those of ATen.
* ``nn.BatchNorm2d`` (exact type) in eval mode with running statistics, affine parameters that need no gradient
  (attacks freeze them) and a 4-D CPU input that needs one: the backward becomes one pass,
  ``(grad * invstd[c]) * weight[c]`` (``torch.ops.robust_ops._eval_batch_norm_backward``, the two multiplies in
  ATen's order). ATen's eval-mode backward also reduces ``sum(grad)`` and ``sum(grad * x_hat)`` per channel for
  weight gradients nobody asked for. ``invstd`` is read off ATen's own backward (its gradient for a grad of ones
  and no weight), so every bit matches. The forward is ``F.batch_norm`` itself. NCHW and channels_last inputs (a
  channels_last model's batch norms: ATen's channels_last backward costs ~5x a copy there); the input gradient takes
  the input's layout, as ATen's, whatever grad_output's.

Everything else -- train-mode BN, parameters that need gradients, other devices and dtypes, inputs in other
layouts, subclasses, modules with their own instance ``forward`` -- runs the module's own forward. Attacks
(``attack_context``) and CPU training (``train.fit``) run under it; ``$ROBUST_OPS_NATIVE_LAYERS=0`` turns it off.
Nested and concurrent uses on one model are counted: the last exit restores the modules. Measured effect:
docs/benchmarks.md (bench_attacks "without native layers").
"""

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ._compile import capturing
from .functional import NATIVE_CPU_DTYPES, _functorch_autodiff, max_pool2d
from ._options import check_device, check_flags, env_switch
from ._patching import check_unmodified, patched_forwards, saved_state, switch_setting
from .memory import library_pool
from .prepacked_conv import prepacked_conv as _prepacked_conv

__all__ = ["native_layers", "native_layers_enabled_by_default", "library_speedups", "ENV_SWITCH"]

ENV_SWITCH = "ROBUST_OPS_NATIVE_LAYERS"


def native_layers_enabled_by_default():
    """Whether ``enabled=None`` means on, as a bool: $ROBUST_OPS_NATIVE_LAYERS (1/true/on/yes or 0/false/off/no, any
    case), read at each call; unset or empty: True. Raises ValueError naming the variable for any other value."""
    return env_switch(ENV_SWITCH, True)


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm whose input gradient is the one-pass _eval_batch_norm_backward."""

    @staticmethod
    def forward(ctx, input, bn, invstd):
        ctx.invstd, ctx.bn, ctx.weight = invstd, bn, bn.weight
        ctx.channels_last = not input.is_contiguous()  # else NCHW (_batch_norm_forward)
        ctx.weight_state = None if bn.weight is None else saved_state(bn.weight)
        return F.batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.weight
        if weight is not None:  # ATen saves the weight for its backward: refuse an in-place change as autograd does
            check_unmodified(weight, ctx.weight_state, "native_layers", ctx.bn)
            weight = weight.detach()
        # ATen's input gradient takes the input's layout, the kernel grad_output's (channels_last) or else a
        # contiguous copy's: grad_output in the input's layout first, so no copy where the two agree and one, in
        # place of the kernel's own, where they do not
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        if not grad_output.is_contiguous(memory_format=layout):
            grad_output = grad_output.contiguous(memory_format=layout)
        return torch.ops.robust_ops._eval_batch_norm_backward(grad_output, ctx.invstd, weight), None, None


def _dense_strides(shape):
    """The strides of a 4-D ``shape`` (N, C, H, W) NCHW and channels_last."""
    _, c, h, w = shape
    return (c * h * w, h * w, w, 1), (h * w * c, 1, w * c, c)


def _eval_bn_invstd(bn, dtype):
    """ATen's eval-mode 1 / sqrt(running_var + eps) per channel, exactly as its backward computes it: the backward
    for a gradient of ones and no weight is (1 * invstd) * 1. Cached per module while the running variance holds the
    same values: compared by content, because a train-mode forward updates it in place without bumping its version
    counter (the cache keyed on the version served a stale invstd to attacks run between training steps)."""
    cached = _invstd_cache.get(bn)
    var = bn.running_var
    if cached is None or cached[0] != (dtype, bn.eps) or not torch.equal(cached[1], var):
        ones = torch.ones(1, bn.num_features, 1, 1, dtype=dtype)
        with torch.no_grad():
            invstd = torch.ops.aten.native_batch_norm_backward(
                ones, ones, None, bn.running_mean, var, None, None, False, bn.eps, [True, False, False],
            )[0].reshape(-1)
        cached = _invstd_cache[bn] = ((dtype, bn.eps), var.detach().clone(), invstd)
    return cached[2]


def _batch_norm_forward(bn, input):
    if (
        bn.training
        or bn.running_mean is None
        or bn.running_var is None
        or input.device.type != "cpu"
        or input.dim() != 4
        or input.dtype not in NATIVE_CPU_DTYPES
        or any(p is not None and (p.dtype != input.dtype or p.device != input.device or p.requires_grad)
               for p in (bn.weight, bn.bias))
        # both statistics in the input's dtype and place: a running mean of another dtype failed in the invstd read,
        # statistics elsewhere (a model moved in parts) in the invstd cache's comparison, each with another message
        # than ATen's
        or any(s.dtype != input.dtype or s.device != input.device for s in (bn.running_mean, bn.running_var))
        or not (torch.is_grad_enabled() and input.requires_grad)
        or _functorch_autodiff(input) is not None  # the autograd.Function has no setup_context / jvp for them
        # It reads data pointers and compares the statistics by value: torch.jit.trace, torch.export and
        # torch.compile(fullgraph=True) failed on it (a captured graph holds ATen's batch norm, same outputs)
        or capturing()
        # (after capturing(): a traced shape's sizes are tensors) strides exactly NCHW's or channels_last's (and not
        # NCHW's too), where ATen's input gradient takes the input's layout; with other strides on a size-1
        # dimension, or channels_last ones that are also NCHW's (N x C x 1 x 1), its choice may follow grad_output's
        # strides too, and for an empty input it is grad_output's
        or not (input.stride() == (dense := _dense_strides(input.shape))[0]
                or (input.stride() == dense[1] and not input.is_contiguous()))
        or input.numel() == 0
    ):
        return nn.BatchNorm2d.forward(bn, input)
    return _EvalBatchNorm.apply(input, bn, _eval_bn_invstd(bn, input.dtype))


def _max_pool_forward(pool, input):
    return max_pool2d(input, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                      pool.return_indices)


_REPLACEMENTS = {nn.MaxPool2d: _max_pool_forward, nn.BatchNorm2d: _batch_norm_forward}
_invstd_cache = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def native_layers(model, enabled=None):
    """While active, run ``model``'s ``nn.MaxPool2d`` layers and the backward of its eval-mode ``nn.BatchNorm2d``
    layers on faster CPU code with bitwise-identical results (module docstring). ``enabled`` None follows the
    innermost enclosing ``native_layers(model, enabled=True or False)`` (an attack inside ``with native_layers(model,
    False):`` runs without them, also when an enclosing block swapped the modules), else
    ``$ROBUST_OPS_NATIVE_LAYERS`` (on)."""
    check_flags("native_layers", {"enabled": enabled}, optional=("enabled",))  # bool("false") is True
    with switch_setting(ENV_SWITCH, model, enabled, native_layers_enabled_by_default, _REPLACEMENTS) as setting:
        swap, undecided = setting
        with patched_forwards(model, _REPLACEMENTS if swap else {}, ENV_SWITCH, undecided):
            yield model


@contextlib.contextmanager
def library_speedups(model, device="cpu", prepacked_conv=None):
    """Everything robust_ops' attacks and CPU training run under, decided in one place: the CPU memory pool
    (robust_ops.memory.library_pool, for CPU work), native layers and prepacked convolutions
    (robust_ops.prepacked_conv; ``prepacked_conv`` None follows ``$ROBUST_OPS_PREPACKED_CONV``, off by default).
    Both swaps are CPU only: on other devices the swapped modules would only fall back. A context manager:
    ``with library_speedups(model, device) as model:`` swaps ``model``'s layers for the block (the pool, native
    layers and prepacked convolutions apply only where ``device``, the work's device, is a CPU)."""
    cpu = check_device("library_speedups", device).type == "cpu"
    with library_pool(device), native_layers(model, enabled=None if cpu else False), \
            _prepacked_conv(model, enabled=prepacked_conv if cpu else False):
        yield model
