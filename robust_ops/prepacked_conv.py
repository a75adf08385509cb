"""Prepacked oneDNN convolutions for attacks on CPU: opt-in, results differ from ATen's in the last bits (NCHW).

Why: ATen runs every float32 CPU ``nn.Conv2d`` as a oneDNN *training* primitive and reorders the weight into
oneDNN's blocked layout at every call, in the forward and again in the input-gradient backward. An attack calls the
same frozen weights 20-30 times per batch (IMA's GenAdv: K + 1 forwards, K backwards and N search forwards). While
``prepacked_conv(model)`` is active, every ``nn.Conv2d`` (exact type) inside an attack reorders its weight once per
attack instead (``mkldnn_reorder_conv2d_weight``) and runs oneDNN's *inference* primitive on it
(``mkldnn::_convolution_pointwise``: the brgemm kernels, which ATen picks only for channels_last inputs). Its input
gradient, for stride-1 ungrouped convolutions, is the forward convolution of the output gradient with the
transposed, flipped kernel -- packed once per attack too; other convolutions keep ATen's ``convolution_backward``.
Measured for resnet18 on 1x28x28 (docs/prepacked-conv.md, after the 2026-12-01 layout fix), forward + input
gradient against ATen's: channels_last 1.40-1.42x faster at 4 rows, 1.01-1.03x at 128 (only the reorders go); NCHW
1.11-1.14x at 4 rows, 0.93-0.95x at 128, slower than ATen's from about 16 rows: use it with a channels_last model.

Semantics:

* Packs live for one ``attack_context`` (:func:`weight_pack_scope`), which freezes the parameters; each belongs to
  one weight tensor and is keyed on its storage, its version counter, the optimizer steps taken in the scope (fused
  optimizers leave the version as it was) and the input's sample shape, one for
  single-row batches and one for larger ones (oneDNN lays them out differently). Outside an attack -- training
  steps, plain user code -- and for weights that need gradients, the module's own forward runs.
* Only float32 CPU inputs of 4 dimensions, contiguous or channels_last, dense CPU parameters,
  ``padding_mode="zeros"`` and numeric padding, outside CPU autocast and torch.func / forward-mode AD; anything else
  runs the module's own forward, and so do inputs and settings ATen refuses (for its message).
* On NCHW models the results are not bitwise ATen's (other kernels sum in another order: relative differences ~1e-6
  in logits; on channels_last models they were bitwise equal on the development machine), so it is off by default:
  ``$ROBUST_OPS_PREPACKED_CONV=1``, ``prepacked_conv(model)``, ``fit(prepacked_conv=True)`` or
  ``robust-ops train/eval --prepacked-conv`` turn it on. Per-sample results stay independent of the batch at the
  sizes :func:`robust_ops.ima.batch_invariant_sizes` measures with it on (the probe's signature includes it).
"""

import contextlib
import threading

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import reference
from ._compile import capturing
from ._options import check_flags, env_switch
from .functional import _functorch_autodiff
from ._patching import active_replacement, check_unmodified, patched_forwards, saved_state, switch_setting

__all__ = ["prepacked_conv", "prepacked_conv_enabled_by_default", "prepacked_conv_resolved", "prepacked_conv_active",
           "weight_pack_scope", "ENV_SWITCH"]

ENV_SWITCH = "ROBUST_OPS_PREPACKED_CONV"

_local = threading.local()


def prepacked_conv_enabled_by_default():
    """Whether ``enabled=None`` means on, as a bool: $ROBUST_OPS_PREPACKED_CONV (1/true/on/yes or 0/false/off/no, any
    case), read at each call; unset or empty: False. Raises ValueError naming the variable for any other value."""
    return env_switch(ENV_SWITCH, False)


def prepacked_conv_resolved(enabled):
    """Whether a run given ``enabled`` packs (None: $ROBUST_OPS_PREPACKED_CONV decides), as fit and the CLI
    record it."""
    return prepacked_conv_enabled_by_default() if enabled is None else bool(enabled)


def _available():
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


# torch.optim steps taken since the first pack scope opened, part of every pack's key: the fused optimizers
# (Adam(fused=True), SGD(fused=True), ...) update parameters in place without bumping their version counters, and so
# does a custom optimizer writing through ``.data``; a pack keyed on the version alone kept serving the weights of
# before the step. The counting hook stays registered: adding and removing it per scope could change torch's hook
# dict while another thread's optimizer step iterates over it.
_optimizer_steps = 0
_step_hook = None
_step_hook_lock = threading.Lock()


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


@contextlib.contextmanager
def weight_pack_scope():
    """The window in which packed weights may be reused: one attack (attack_context opens it after freezing the
    parameters). Nested scopes each start empty; packs are dropped at exit. Any optimizer step inside repacks."""
    global _step_hook
    if _step_hook is None:
        with _step_hook_lock:
            if _step_hook is None:
                _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append({})
    try:
        yield
    finally:
        stack.pop()


def _current_packs():
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _pack(weight, padding, stride, dilation, groups, input_shape):
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), padding, stride, dilation, groups,
                                                     list(input_shape))


def _input_gradient_padding(conv, weight=None):
    """The padding of the forward convolution that computes ``conv``'s input gradient from its output gradient
    with the transposed, flipped kernel; None where that does not hold (strided, grouped, or padded beyond the
    kernel's reach). The kernel is the weight's, as ATen reads it, not ``conv.kernel_size``: a weight replaced by
    one of another size (model surgery) made a backward of the wrong shape. ``weight``: the forward's (default the
    module's)."""
    if conv.stride != (1, 1) or conv.groups != 1:
        return None
    kernel = (conv.weight if weight is None else weight).shape[2:]
    padding = [d * (k - 1) - p for d, k, p in zip(conv.dilation, kernel, conv.padding)]
    return padding if min(padding) >= 0 else None


class _Packs:
    # weight: the tensor packed, held (so no other tensor can take its address while the entry lasts): the key alone
    # matched a new weight that the allocator put at a freed weight's address (version 0 both), which then ran on the
    # freed weight's pack. Not a weakref: torch.utils.swap_tensors (Module.to / load_state_dict under
    # torch.__future__.set_swap_module_params_on_conversion) refuses a tensor that has one.
    __slots__ = ("key", "weight", "forward", "backward", "backward_padding", "backward_ready")

    def __init__(self, key, weight, forward):
        self.key, self.weight, self.forward = key, weight, forward
        self.backward = self.backward_padding = None
        self.backward_ready = False


def _aten_memory_format(input, weight):
    """The layout of ATen's (oneDNN) convolution output and input gradient: channels_last when the input's or the
    weight's strides suggest it (``Tensor.suggest_memory_format``'s rule, which also reads the strides of size-1
    dimensions: ``reference._suggested_memory_format``). oneDNN's inference primitive writes channels_last whatever
    the input, and an NCHW model's ``.view(n, -1)`` after a convolution then failed inside attacks; so did a batch of
    one HWC image (``permute(2, 0, 1).unsqueeze(0)``: channels_last-contiguous, NCHW to ATen), when a tensor
    contiguous in one layout only was taken to be in that one."""
    channels_last = torch.channels_last in (reference._suggested_memory_format(input),
                                            reference._suggested_memory_format(weight))
    return torch.channels_last if channels_last else torch.contiguous_format


def _in_layout(t, memory_format):
    """``t`` with the strides ATen allocates in ``memory_format``, those of size-1 dimensions included: they decide
    the layout the next convolution suggests (a 1-channel gradient is contiguous either way)."""
    t = t.contiguous(memory_format=memory_format)
    want = torch.empty(t.shape, device="meta", memory_format=memory_format).stride()
    # a copy, not an as_strided view: a custom Function's output that is a view refuses in-place ops (ReLU(inplace))
    return t if t.stride() == want else torch.empty_strided(t.shape, want, dtype=t.dtype).copy_(t)


class _PrepackedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, conv, packs):
        # the weight itself, as ATen's convolution saves it: the backward reads this one even if the module gets
        # another, and it stays alive, so no other tensor can take its address while the packs serve it
        ctx.conv, ctx.packs, ctx.weight = conv, packs, conv.weight
        ctx.input_shape, ctx.memory_format = input.shape, _aten_memory_format(input, conv.weight)
        if _input_gradient_padding(conv) is None:
            ctx.save_for_backward(input)
        # oneDNN reads the bias as a dense vector, whatever its strides: a bias that is a strided view (a pruned
        # layer's ``bias[::2]``) gave wrong outputs, silently
        bias = None if conv.bias is None else conv.bias.contiguous()
        output = torch.ops.mkldnn._convolution_pointwise(
            input, packs.forward, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "none", [], None)
        return _in_layout(output, ctx.memory_format)

    @staticmethod
    def backward(ctx, grad_output):
        conv, packs, weight = ctx.conv, ctx.packs, ctx.weight
        check_unmodified(weight, packs.key[:2], "prepacked_conv", conv)  # the packs are stale
        weight = weight.detach()
        if torch.is_grad_enabled():  # create_graph=True: ATen's input gradient, which autograd differentiates again
            return torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_output, conv.stride,
                                              conv.padding, conv.dilation, conv.groups), None, None
        grad_output = grad_output.contiguous(memory_format=ctx.memory_format)
        if not packs.backward_ready:
            padding = _input_gradient_padding(conv, weight)
            if padding is not None:
                flipped = weight.transpose(0, 1).flip(2, 3)
                packs.backward = _pack(flipped, padding, [1, 1], list(conv.dilation), 1, grad_output.shape)
                packs.backward_padding = padding
            packs.backward_ready = True
        if packs.backward is not None:
            grad_input = torch.ops.mkldnn._convolution_pointwise(
                grad_output, packs.backward, None, packs.backward_padding, [1, 1], list(conv.dilation), 1, "none", [],
                None)
            grad_input = _in_layout(grad_input, ctx.memory_format)
        else:
            (input,) = ctx.saved_tensors
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, list(conv.stride), list(conv.padding),
                list(conv.dilation), False, [0, 0], conv.groups, [True, False, False])[0]
        return grad_input, None, None


def _refused_by_aten(conv, shape):
    """Whether ATen refuses a 4-D input of ``shape`` (other channels, an empty or too small padded size) or the
    module's settings (non-positive stride or dilation, negative padding): it says why, while oneDNN says ``could
    not create a primitive descriptor`` or, for stride 0, kills the process (SIGFPE). Channels and kernel are the
    weight's, as ATen checks them: a weight replaced without ``in_channels`` / ``kernel_size`` (a 1-channel first
    layer made by summing an RGB one) was not packed, or packed for inputs ATen refuses."""
    weight = conv.weight
    if weight.dim() != 4 or conv.groups < 1 or weight.shape[0] % conv.groups:
        return True
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = conv.padding, conv.stride, conv.dilation, weight.shape[2:]
    return (shape[1] != weight.shape[1] * conv.groups or not shape[2] or not shape[3]
            or shape[2] + 2 * ph < dh * (kh - 1) + 1 or shape[3] + 2 * pw < dw * (kw - 1) + 1
            or ph < 0 or pw < 0 or sh < 1 or sw < 1 or dh < 1 or dw < 1)


def _conv_forward(conv, input):
    packs = _current_packs()
    weight, bias = conv.weight, conv.bias
    if (
        packs is None
        # torch.jit.trace (torch.onnx.export's TorchScript exporter) failed in the packed path (traced sizes are
        # tensors; oneDNN's op has no trace form), and torch.compile(fullgraph=True) at torch.backends.mkldnn, which
        # dynamo does not trace: a captured graph holds ATen's convolution, as for native_layers' layers
        or capturing()
        or not _available()
        or input.device.type != "cpu"
        or input.dtype != torch.float32
        or input.dim() != 4
        or input.shape[0] == 0
        or isinstance(conv.padding, str)
        or conv.padding_mode != "zeros"
        or weight.dtype != torch.float32
        or weight.requires_grad
        # parameters off the CPU beside a CPU input (a model moved in parts; meta) or sparse: ATen's error, where the
        # pack failed in to_mkldnn or oneDNN ("itensor_view_from_dense expects CPU tensor input")
        or any(p is not None and (p.device.type != "cpu" or p.layout != torch.strided) for p in (weight, bias))
        or (bias is not None and (bias.requires_grad or bias.dtype != torch.float32))
        or not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last))
        or torch.is_autocast_enabled("cpu")  # ATen's convolution runs in the autocast dtype; the packs in float32
        or _functorch_autodiff(input) is not None  # the autograd.Function has no setup_context / jvp for them
    ):
        return nn.Conv2d.forward(conv, input)
    key = (*saved_state(weight), _optimizer_steps, tuple(input.shape[1:]))  # the backward checks the first two again
    # oneDNN packs for one row and for several differently: a pack made for the other kind costs a reorder of the
    # whole weight at every call (7 ms for a 128-channel 3x3 conv against 0.3 ms of convolution), so each kind keeps
    # its own.
    slot = (conv, input.shape[0] == 1)
    entry = packs.get(slot)
    if entry is None or entry.key != key or entry.weight is not weight:
        if _refused_by_aten(conv, input.shape):  # checked per new pack only: the key holds the sample shape
            return nn.Conv2d.forward(conv, input)
        forward = _pack(weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, input.shape)
        entry = packs[slot] = _Packs(key, weight, forward)
    return _PrepackedConv2d.apply(input, conv, entry)


_REPLACEMENTS = {nn.Conv2d: _conv_forward}


@contextlib.contextmanager
def prepacked_conv(model, enabled=None):
    """While active, ``model``'s ``nn.Conv2d`` layers run on once-per-attack packed oneDNN weights inside attacks
    (module docstring). ``enabled`` None follows the innermost enclosing ``prepacked_conv(model, enabled=True or
    False)`` (``fit``'s setting reaches the attacks inside it), else ``$ROBUST_OPS_PREPACKED_CONV`` (off)."""
    check_flags("prepacked_conv", {"enabled": enabled}, optional=("enabled",))  # bool("false") is True
    with switch_setting(ENV_SWITCH, model, enabled, prepacked_conv_enabled_by_default, _REPLACEMENTS) as setting:
        swap, undecided = setting
        with patched_forwards(model, _REPLACEMENTS if swap and _available() else {}, ENV_SWITCH, undecided):
            yield model


def prepacked_conv_active(model):
    """Whether any ``nn.Conv2d`` of ``model`` currently runs through :func:`prepacked_conv`."""
    return any(type(m) is nn.Conv2d and active_replacement(m) is _conv_forward for m in model.modules())
