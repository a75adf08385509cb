"""Autograd for the differentiable ops, registered once with torch.library.register_autograd.

drop_max_pool2d and max_pool2d: the gradient goes to the selected element's position (indices), through the shared
index-scatter op _drop_max_pool2d_backward. That backward is linear in grad_output, so double backward (needed by
gradient-regularization defenses) is a gather at the same indices.
pgd_step_ and boundary_search_step_ are in-place updates that run under no_grad and have no autograd.
"""

import torch


def _gather_at(grad_input, indices):
    """Double backward of the pooling backward: d(grad_input)/d(grad_output) is a gather at indices."""
    # flatten, not reshape(n, c, -1): -1 cannot be inferred for an empty batch.
    idx = indices.flatten(2)
    picked = grad_input.flatten(2).gather(2, idx.clamp_min(0))
    # Index -1 (a window without input elements) took no gradient in the backward, so it gives none back here.
    return picked.masked_fill(idx < 0, 0).reshape(indices.shape)


def register_drop_max_autograd(forward_name, backward_name):
    """Wire forward op's backward to the backward op, both given as "robust_ops::name", and the backward op's own
    (double) backward (the native and Triton variants share this)."""
    register_pooling_forward_autograd(forward_name, backward_name)

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

    def backward(ctx, grad_output, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_input = backward_op(grad_output, indices, ctx.input_size)
        return grad_input, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


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
