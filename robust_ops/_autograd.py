"""Autograd for the differentiable ops, registered once with torch.library.register_autograd.

drop_max_pool2d and max_pool2d: the gradient goes to the selected element's position (indices), through the shared
index-scatter op _drop_max_pool2d_backward. That backward is linear in grad_output, so double backward (needed by
gradient-regularization defenses) is a gather at the same indices.
Under torch.func (grad, vjp, jacrev, jvp, and vmap around them) and torch.autograd.forward_ad, where torch's
register_autograd Function cannot run, the functional form runs a drop-max op through the torch.autograd.Function
that register_drop_max_autograd makes for it (FUNCTORCH_FUNCTIONS); so does the pooling ops' backward for a grad_output
carrying a forward-mode tangent (BACKWARD_FUNCTIONS). The pooling ops' vmap rule (register_vmap) folds
the vmapped dimension into N: the kernels batch over samples already.
pgd_step_ and boundary_search_step_ (and their Triton variants) are in-place updates without a gradient:
register_in_place_without_gradient gives them the Autograd and ADInplaceOrView behaviour of PyTorch's own in-place ops
(docs/ops/pgd_step.md, "Autograd").
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.graph import increment_version

from ._meta import check_drop_max_pool2d_backward_args, pool_memory_format


def _gather_at(grad_input, indices):
    """Double backward of the pooling backward: d(grad_input)/d(grad_output) is a gather at indices."""
    # Sizes spelled out: reshape(n, c, -1) cannot infer -1 for an empty batch, and flatten has no rule in the vmap of
    # torch.autograd's batched gradients (gradgradcheck, autograd.functional.hessian(vectorize=True)).
    n, c, h, w = grad_input.shape
    idx = indices.reshape(n, c, indices.shape[2] * indices.shape[3])
    picked = grad_input.reshape(n, c, h * w).gather(2, idx.clamp_min(0))
    # Index -1 (a window without input elements) took no gradient in the backward, so it gives none back here.
    return picked.masked_fill(idx < 0, 0).reshape(indices.shape)


def _one_plane_channels_last(input, indices):
    """Whether the pooling backward's grad_input must be made channels_last here: the backward op takes the layout
    from the indices, and N x 1 x 1 x 1 indices have the same strides in both layouts, so a one-channel
    channels_last input pooled to 1 x 1 (ATen: suggest_memory_format, strides (H*W, 1, W, 1)) got NCHW's
    (H*W, H*W, W, 1). Only there is the input's layout read (under vmap it cannot be, and none is observable).
    Each size against 1 on its own, channels first: under torch.compile a comparison of two symbolic sizes (C with
    H_out) added a guard, and a recompile, to every dynamic-shape graph."""
    return (indices.dim() == 4 and indices.shape[1] == 1 and indices.shape[2] == 1 and indices.shape[3] == 1
            and not torch._C._functorch.is_batchedtensor(input) and pool_memory_format(input) == torch.channels_last)


def _as_channels_last(grad_input):
    """A one-channel grad_input (contiguous in both layouts) viewed with channels_last strides: the same elements."""
    n, _, h, w = grad_input.shape
    return grad_input.view(n, h, w, 1).permute(0, 3, 1, 2)


def _fold(t, bdim, batch_size):
    """A vmapped tensor as one batch: its vmapped dim (broadcast where it has none) merged into its first, N."""
    t = t.unsqueeze(0).expand(batch_size, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.flatten(0, 1) if t.dim() > 1 else t[0]  # t[0]: a 0-D sample, refused by the op's own dim check


def register_pooling_vmap(forward_name):
    """vmap of a pooling op (input, geometry) -> (output, indices): one call on the samples of every vmapped batch."""
    forward_op = getattr(torch.ops.robust_ops, forward_name.split("::")[1])

    def batched(info, in_dims, input, *geometry):
        # input is the one tensor argument: vmapped (in_dims[0] is not None) whenever this rule runs
        out, idx = forward_op(_fold(input, in_dims[0], info.batch_size), *geometry)
        shape = (info.batch_size, input.shape[1 if in_dims[0] == 0 else 0])
        return (out.unflatten(0, shape), idx.unflatten(0, shape)), (0, 0)

    torch.library.register_vmap(forward_name, batched)


def register_pooling_backward_vmap(backward_name):
    backward_op = getattr(torch.ops.robust_ops, backward_name.split("::")[1])

    def batched(info, in_dims, grad_output, indices, input_size):
        b = info.batch_size
        # The per-sample call's checks first, so a message names the caller's sizes, not the folded batch's.
        meta = [torch.empty(t.shape[:d] + t.shape[d + 1:] if d is not None else t.shape, dtype=t.dtype, device="meta")
                for t, d in ((grad_output, in_dims[0]), (indices, in_dims[1]))]
        check_drop_max_pool2d_backward_args(*meta, input_size)
        grad_input = backward_op(_fold(grad_output, in_dims[0], b), _fold(indices, in_dims[1], b),
                                 [b * input_size[0], *input_size[1:]])
        return grad_input.unflatten(0, (b, input_size[0])), 0

    torch.library.register_vmap(backward_name, batched)


# forward op name -> apply(input, kernel_size, stride, padding, dilation, ceil_mode): the op through its own
# torch.autograd.Function, which functional.drop_max_pool2d runs under torch.func and forward-mode AD
FUNCTORCH_FUNCTIONS = {}
# backward op name -> apply(grad_output, indices, input_size): the backward op through a Function with a forward-mode
# formula, which the pooling ops' backward runs for a grad_output carrying a forward-mode tangent
BACKWARD_FUNCTIONS = {}


class _Opaque:
    """Non-tensor arguments as one pytree leaf: torch.func flattens list arguments of an autograd.Function into
    leaves, and its generated vmap rule for jvp then failed to unflatten them ("leaves has length 6 but the spec
    refers to a pytree that holds 10 items")."""

    def __init__(self, value):
        self.value = value


def _functorch_function(forward_name, backward_name):
    """torch.func and forward-mode AD for a drop-max op: torch's register_autograd Function refuses torch.func ("it
    must override the setup_context staticmethod") and has no forward-mode formula. Same backward op and double
    backward as register_autograd's; the tangent of the output is the input's tangent at the selected element.
    generate_vmap_rule: vmap of the forward and backward ops is their register_vmap rule."""
    forward_op = getattr(torch.ops.robust_ops, forward_name.split("::")[1])
    backward_op = getattr(torch.ops.robust_ops, backward_name.split("::")[1])

    class PoolBackward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(grad_output, indices, input_size):
            return backward_op(grad_output, indices, input_size.value)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _, indices, ctx.input_size = inputs
            ctx.save_for_backward(indices)
            ctx.save_for_forward(indices)

        @staticmethod
        def backward(ctx, grad_grad_input):
            (indices,) = ctx.saved_tensors
            return _gather_at(grad_grad_input, indices), None, None

        @staticmethod
        def jvp(ctx, grad_output_tangent, _indices_tangent, _input_size_tangent):
            (indices,) = ctx.saved_tensors
            return PoolBackward.apply(grad_output_tangent, indices, ctx.input_size)

    class Pool(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(input, geometry):
            return forward_op(input, *geometry.value)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _, indices = output
            ctx.mark_non_differentiable(indices)
            ctx.save_for_backward(indices)
            ctx.save_for_forward(indices)
            ctx.input_size = _Opaque(list(inputs[0].shape))
            ctx.channels_last = _one_plane_channels_last(inputs[0], indices)

        @staticmethod
        def backward(ctx, grad_output, _grad_indices):
            (indices,) = ctx.saved_tensors
            grad_input = PoolBackward.apply(grad_output, indices, ctx.input_size)
            return _as_channels_last(grad_input) if ctx.channels_last else grad_input, None

        @staticmethod
        def jvp(ctx, input_tangent, _geometry_tangent):
            (indices,) = ctx.saved_tensors
            return _gather_at(input_tangent, indices), None

    def apply(input, kernel_size, stride, padding, dilation, ceil_mode):
        return Pool.apply(input, _Opaque((kernel_size, stride, padding, dilation, ceil_mode)))

    BACKWARD_FUNCTIONS[backward_name] = lambda grad_output, indices, input_size: PoolBackward.apply(
        grad_output, indices, _Opaque(input_size))
    return apply


def register_drop_max_autograd(forward_name, backward_name):
    """Wire forward op's backward to the backward op, both given as "robust_ops::name", and the backward op's own
    (double) backward (the native and Triton variants share this); their vmap rules and torch.func Function."""
    register_pooling_forward_autograd(forward_name, backward_name)
    register_pooling_backward_vmap(backward_name)
    FUNCTORCH_FUNCTIONS[forward_name] = _functorch_function(forward_name, backward_name)

    def backward_setup_context(ctx, inputs, output):
        _, indices, _ = inputs
        ctx.save_for_backward(indices)

    def backward_backward(ctx, grad_grad_input):
        (indices,) = ctx.saved_tensors
        return _gather_at(grad_grad_input, indices), None, None

    torch.library.register_autograd(backward_name, backward_backward, setup_context=backward_setup_context)


def register_pooling_forward_autograd(forward_name, backward_name):
    """A pooling op returning (output, indices) whose gradient is backward_name(grad_output, indices, input_size)."""
    backward_op = getattr(torch.ops.robust_ops, backward_name.split("::")[1])

    def setup_context(ctx, inputs, output):
        input = inputs[0]
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.input_size = list(input.shape)
        ctx.channels_last = _one_plane_channels_last(input, indices)

    def backward(ctx, grad_output, _grad_indices):
        (indices,) = ctx.saved_tensors
        # Forward-mode AD through the gradient (a jvp of a create_graph backward, gradgradcheck's
        # check_fwd_over_rev): the backward op's register_autograd has no forward formula, and grad_input came
        # without a tangent, silently (zero), or gradgradcheck failed with "You must implement the jvp function".
        if fwAD.unpack_dual(grad_output).tangent is not None:
            grad_input = BACKWARD_FUNCTIONS[backward_name](grad_output, indices, ctx.input_size)
        else:
            grad_input = backward_op(grad_output, indices, ctx.input_size)
        return _as_channels_last(grad_input) if ctx.channels_last else grad_input, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    register_pooling_vmap(forward_name)


def _eval_batch_norm_backward_backward(ctx, grad):
    # Linear in grad_output with a constant factor: its own derivative is the same op.
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("_eval_batch_norm_backward: gradients with respect to invstd and weight are not "
                           "implemented; detach them (native_layers only uses it with frozen parameters)")
    invstd, weight = ctx.saved
    return torch.ops.robust_ops._eval_batch_norm_backward(grad, invstd, weight), None, None


def _eval_batch_norm_backward_setup(ctx, inputs, output):
    ctx.saved = inputs[1:]


torch.library.register_autograd("robust_ops::_eval_batch_norm_backward", _eval_batch_norm_backward_backward,
                                setup_context=_eval_batch_norm_backward_setup)
register_drop_max_autograd("robust_ops::drop_max_pool2d", "robust_ops::_drop_max_pool2d_backward")
register_pooling_forward_autograd("robust_ops::max_pool2d", "robust_ops::_drop_max_pool2d_backward")


# Kept alive for the life of the process: dropping a Library removes its registrations.
_IN_PLACE_LIBRARY = torch.library.Library("robust_ops", "FRAGMENT")


def register_in_place_without_gradient(op_name):
    """Make the mutating op op_name ("robust_ops::name") behave as a non-differentiable in-place PyTorch op:

    * under grad mode, a tensor argument that requires grad is an error naming the op and the argument. The op
      records no graph, so stepping a leaf would change it behind autograd's back and stepping a non-leaf would leave
      its old grad_fn in place: backward gave silently wrong gradients;
    * every call bumps the version counter of each mutated argument, so a backward that saved one of them raises
      PyTorch's "modified by an inplace operation" error.

    torch.library gives a C++-defined (TORCH_LIBRARY) op neither: its Autograd key falls back to the autograd fallback,
    which records and raises nothing for an op that returns nothing, and its ADInplaceOrView key is a fallthrough.
    torch.library.custom_op/triton_op ops bump versions (a Python ADInplaceOrView kernel) but also accept tensors
    that require grad silently. register_autograd refuses mutating ops, so both kernels are registered directly.
    """
    name = op_name.split("::")[1]
    op = getattr(torch.ops.robust_ops, name).default
    argument_names = [argument.name for argument in op._schema.arguments]
    mutated = [
        index for index, argument in enumerate(op._schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    ]

    def raise_for_argument_requiring_grad(args):
        argument = next(
            argument_name for argument_name, value in zip(argument_names, args)
            if isinstance(value, torch.Tensor) and value.requires_grad
        )
        raise RuntimeError(
            f"{name}: {argument} requires grad, but {name} is an in-place update without a gradient -- call it under "
            f"torch.no_grad() or pass {argument}.detach()"
        )

    def raise_if_inference_tensor(args):
        # An inference tensor has no version counter: increment_version skips it without a word, so the op wrote it
        # where PyTorch's in-place ops refuse. A mutated argument is a tensor or None (isinstance(None, Tensor) costs
        # a metaclass call); about 1 us per call on CPU, against 5 to 6 us for these kernels and ~50 us for the step.
        if torch.is_inference_mode_enabled():
            return
        for index in mutated:
            if index < len(args) and args[index] is not None and args[index].is_inference():
                break
        else:
            return
        argument = argument_names[index]
        raise RuntimeError(
            f"{name}: {argument} is an inference tensor (made under torch.inference_mode()), and an in-place update "
            f"to an inference tensor outside InferenceMode is not allowed, as for PyTorch's own in-place ops -- call "
            f"{name} inside torch.inference_mode() or pass {argument}.clone()"
        )

    def bump_versions_and_run(keyset, *args):
        raise_if_inference_tensor(args)  # before the kernel: a refused call writes nothing (torch's add_ writes first)
        # As PyTorch's ADInplaceOrView kernels: run below this key, then bump, so a call the kernel rejects (before
        # writing anything) bumps nothing either; bumping first made a later backward that had saved x_adv raise
        # "modified by an inplace operation" for a step that never happened. The dispatcher may leave out trailing
        # arguments equal to their defaults.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            result = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        increment_version([args[index] for index in mutated if index < len(args) and args[index] is not None])
        return result

    def autograd_kernel(keyset, *args):
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args):
            raise_for_argument_requiring_grad(args)
        # Bumping here and redispatching past ADInplaceOrView costs one Python call per op call, not two (4 to 5 us
        # each on CPU); the ADInplaceOrView kernel still bumps where the Autograd key is skipped (inference mode).
        return bump_versions_and_run(keyset, *args)

    # allow_override: a triton_op (custom_op) already has Python Autograd/ADInplaceOrView kernels, replaced here on
    # purpose; torch 2.14 allows that by default, torch <= 2.11 (a GPU machine's image) refused the Triton ops' import.
    _IN_PLACE_LIBRARY.impl(name, autograd_kernel, "Autograd", with_keyset=True, allow_override=True)
    _IN_PLACE_LIBRARY.impl(name, bump_versions_and_run, "ADInplaceOrView", with_keyset=True, allow_override=True)


register_in_place_without_gradient("robust_ops::pgd_step_")
register_in_place_without_gradient("robust_ops::boundary_search_step_")
