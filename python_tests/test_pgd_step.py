"""torch.ops.robust_ops.pgd_step_ (native kernels): bitwise equality with robust_ops.reference.pgd_step_ and with the
torchattacks 3.5.1 expression chains in float32/float64, tolerances for float16/bfloat16, in-place semantics for any
strides, history slots, zero gradients, opcheck, torch.compile and every error message."""

import math
import re

import numpy as np
import pytest
import torch

import robust_ops
from robust_ops import reference
from robust_ops._meta import check_pgd_step_args, check_pgd_step_values

from conftest import cpu_and_cuda
from utils import (TOLERANCES, assert_verbose_equal, check_in_place_op_mutation_is_seen_by_backward,
                   check_in_place_op_rejected_call_bumps_no_version,
                   check_in_place_op_refuses_argument_requiring_grad,
                   check_in_place_op_runs_outside_grad_mode_and_bumps_versions, record_backend_requests)

op = torch.ops.robust_ops.pgd_step_
NORMS = ("linf", "l2")
# (3, 2, 1100): samples of 2200 elements span three blocks of the CUDA kernel (1024 elements each, the last partial)
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4, 5), (5, 1, 9, 13), (3, 2, 3, 4, 5), (3, 2, 1100)]


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0, clip=(0.0, 1.0), zero_grad=(), scale=0.05):
    """x_nat in the clip range, x_adv near it (inside the clip range), a gradient, per-sample alpha/eps [N]."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = clip
    n = shape[0]
    x_nat = (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    x_adv = (x_nat + scale * (hi - lo) * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(lo, hi)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    for i in zero_grad:
        grad[i] = 0
    alpha = torch.rand(n, generator=gen, dtype=torch.float64) * 0.05 * (hi - lo) + 1e-3
    eps = torch.rand(n, generator=gen, dtype=torch.float64) * 0.1 * (hi - lo)
    per_sample_dtype = torch.promote_types(dtype, torch.float32)
    to = dict(device=device, dtype=dtype)
    return (x_adv.to(**to), x_nat.to(**to), grad.to(**to), alpha.to(device=device, dtype=per_sample_dtype),
            eps.to(device=device, dtype=per_sample_dtype))


def run_both(x_adv, x_nat, grad, alpha, eps, clip, norm, history=None, slot=0):
    """Runs the op and the reference on copies; returns ((x_op, hist_op), (x_ref, hist_ref))."""
    ours, ref = x_adv.clone(), x_adv.clone()
    h_ours = None if history is None else history.clone()
    h_ref = None if history is None else history.clone()
    op(ours, x_nat, grad, alpha, eps, clip[0], clip[1], norm, h_ours, slot)
    reference.pgd_step_(ref, x_nat, grad, alpha, eps, clip[0], clip[1], norm, h_ref, slot)
    return (ours, h_ours), (ref, h_ref)


# ---------------------------------------------------------------------------------------------------------------------
# Exact equality with the reference


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_exactly(device, dtype, norm, shape):
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, dtype, device, seed=sum(shape))
    history = torch.full((3,) + shape, -7.0, dtype=dtype, device=device)
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, slot=1)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours, h_ref, "history")
    assert bool((h_ours[0] == -7).all()) and bool((h_ours[2] == -7).all()), "other history slots must be untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_random_shapes_and_clip_ranges(dtype, norm):
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        ndim = int(torch.randint(1, 5, (1,), generator=gen))
        shape = tuple(int(s) for s in torch.randint(1, 9, (ndim,), generator=gen))
        lo = float(torch.rand(1, generator=gen)) * 2 - 1
        clip = (lo, lo + 0.1 + float(torch.rand(1, generator=gen)) * 3)
        inputs = make_inputs(shape, dtype, seed=trial, clip=clip, scale=0.3)
        (ours, _), (ref, _) = run_both(*inputs, clip, norm)
        assert_verbose_equal(ours, ref, f"x_adv shape={shape} clip={clip}")


@pytest.mark.parametrize("norm", NORMS)
def test_clip_range_is_applied(norm):
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 8, 8), clip=(-1.0, 2.0), scale=0.5)
    eps.fill_(10.0)
    alpha.fill_(5.0)  # a step far beyond the clip range
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.25, 0.75), norm)
    assert_verbose_equal(ours, ref)
    assert float(ours.min()) >= 0.25 and float(ours.max()) <= 0.75


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_nan_propagates_like_torch_clamp(dtype, norm, device):
    """A NaN in x_adv or x_nat stays NaN, as torch.clamp keeps NaN: it is not clamped to eps or the clip range."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 4, 5), dtype, device)
    x_adv[0, 1, 2, 3] = float("nan")
    x_nat[2, 0, 1, 1] = float("nan")
    history = torch.zeros((1,) + tuple(x_adv.shape), dtype=dtype, device=device)
    (ours, h_ours), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours[0], ref, "history")
    assert bool(ours[0, 1, 2, 3].isnan()) and bool(ours[2, 0, 1, 1].isnan())
    assert not bool(ours[1].isnan().any())


@pytest.mark.parametrize("norm", NORMS)
def test_equal_clip_bounds_are_accepted(norm):
    """clip_min <= clip_max admits a single-point clip range: every element lands on it (no error)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4))
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.5, 0.5), norm)
    assert_verbose_equal(ours, ref)
    assert bool((ours == 0.5).all())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_history_slots_receive_each_iterate(norm, device):
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 5, 5), device=device)
    history = torch.zeros((4,) + tuple(x_adv.shape), device=device)
    ref = x_adv.clone()
    for slot in range(4):
        g = torch.randn_like(grad)
        op(x_adv, x_nat, g, alpha, eps, 0.0, 1.0, norm, history, slot)
        reference.pgd_step_(ref, x_nat, g, alpha, eps, 0.0, 1.0, norm)
        assert_verbose_equal(history[slot], ref, f"history[{slot}]")
    assert_verbose_equal(x_adv, ref)


def test_float64_alpha_eps_for_float32_inputs():
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 6, 6))
    for norm in NORMS:
        (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha.double() / 3, eps.double() / 3, (0.0, 1.0), norm)
        assert_verbose_equal(ours, ref)


# ---------------------------------------------------------------------------------------------------------------------
# Strides, aliasing, in-place semantics


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_inputs_are_updated_in_place(dtype, norm, device):
    shape = (4, 3, 6, 5)
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, dtype, device)
    expected, _ = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm)[1]
    # x_adv channels_last, x_nat a strided slice, grad transposed, history with the batch dimension first.
    x_cl = x_adv.contiguous(memory_format=torch.channels_last)
    x_nat_big = torch.zeros((4, 3, 6, 10), dtype=dtype, device=device)
    x_nat_big[..., ::2] = x_nat
    x_nat_strided = x_nat_big[..., ::2]
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)
    history = torch.zeros((4, 2) + shape[1:], dtype=dtype, device=device).transpose(0, 1)  # [2, 4, ...], strided
    assert not (x_cl.is_contiguous() or x_nat_strided.is_contiguous() or grad_t.is_contiguous()
                or history[1].is_contiguous())
    ptr = x_cl.data_ptr()
    op(x_cl, x_nat_strided, grad_t, alpha, eps, 0.0, 1.0, norm, history, 1)
    assert x_cl.data_ptr() == ptr and x_cl.is_contiguous(memory_format=torch.channels_last)
    assert_verbose_equal(x_cl, expected, "x_adv")
    assert_verbose_equal(history[1], expected, "history[1]")
    assert bool((history[0] == 0).all())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_dense_non_contiguous_history_slot(norm, device):
    """history[slot] channels_last (dense, so no overlap status hides it; the test above has a slot with gaps):
    written element by element in its own layout, not as if contiguous (mutation testing: dropping the slot's
    is_contiguous() check before writing it directly survived)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4, 5), device=device)
    history = torch.zeros((2, 2, 4, 5, 3), device=device).permute(0, 1, 4, 2, 3)
    assert history[1].is_contiguous(memory_format=torch.channels_last) and not history[1].is_contiguous()
    (ours, h_ours), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, 1)
    assert_verbose_equal(h_ours[1], ref, "history[1]")
    assert_verbose_equal(ours, ref, "x_adv")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_grad_with_batch_stride_matches_reference(norm, device):
    """A grad whose reshape(N, -1) is a strided view (rows of a bigger buffer): the norms still match bitwise."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 7, 7), device=device)
    big = torch.randn((8, 3, 7, 7), device=device)
    big[::2] = grad
    (ours, _), (ref, _) = run_both(x_adv, x_nat, big[::2], alpha, eps, (0.0, 1.0), norm)
    assert_verbose_equal(ours, ref)


def check_l2_batch_innermost_layout(step, dtype, layout, device="cpu"):
    """An x_adv whose reshape(N, -1) is a strided view (batch innermost): the eager chain's delta has x_adv's layout
    and ATen reduces its norm in stride order; the norm of the kernel's contiguous delta was off in the last bit."""
    shape = (3, 4, 8, 9) if layout == "batch_innermost" else (300, 4)
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, dtype, device, seed=11)
    if layout == "batch_innermost":
        x_adv, x_nat, grad = (t.permute(3, 0, 1, 2) for t in (x_adv, x_nat, grad))
    else:
        x_adv, x_nat, grad = (t.t() for t in (x_adv, x_nat, grad))
    alpha = alpha[:1].expand(x_adv.shape[0]) * 20  # steps long enough that every sample is projected
    eps = eps[:1].expand(x_adv.shape[0]).contiguous()
    ours, expected = x_adv.clone(), x_adv.clone()
    reference.pgd_step_(expected, x_nat, grad, alpha, eps, -10.0, 10.0, "l2")
    step(ours, x_nat, grad, alpha, eps, -10.0, 10.0, "l2", None, 0)
    assert_verbose_equal(ours, expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["batch_innermost", "transposed_2d"])
def test_l2_batch_innermost_layout_matches_reference_exactly(dtype, layout, device):
    check_l2_batch_innermost_layout(op, dtype, layout, device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_x_nat_aliasing_x_adv(norm, device):
    """x_nat may be x_adv itself (the first step without random start); the result equals the unaliased one."""
    x_adv, _, grad, alpha, eps = make_inputs((3, 2, 5, 5), device=device)
    expected = x_adv.clone()
    reference.pgd_step_(expected, x_adv.clone(), grad, alpha, eps, 0.0, 1.0, norm)
    op(x_adv, x_adv, grad, alpha, eps, 0.0, 1.0, norm, None, 0)
    assert_verbose_equal(x_adv, expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_grad_sharing_memory_with_x_adv(norm, device):
    """grad one sample before x_adv in one buffer (grad[s + 1] is x_adv[s]): the step uses the gradient as given, as
    the reference does; without the kernel's copy, sample s + 1 read its gradient after sample s had stepped over it
    (mutation testing: never copying an overlapping grad survived)."""
    x_adv, x_nat, _, alpha, eps = make_inputs((3, 2, 5, 5), device=device)
    buf = torch.cat([torch.randn((1, 2, 5, 5), device=device), x_adv])
    expected = x_adv.clone()
    reference.pgd_step_(expected, x_nat, buf[:-1].clone(), alpha, eps, 0.0, 1.0, norm)
    op(buf[1:], x_nat, buf[:-1], alpha, eps, 0.0, 1.0, norm, None, 0)
    assert_verbose_equal(buf[1:], expected)


def check_per_sample_values_sharing_written_memory(step, norm, shared, device="cpu"):
    """alpha / eps as views of x_adv or of history[slot] (alpha = x_adv.view(-1)[:N]): the kernels read alpha[s] after
    earlier samples had written their step (or slot) over it; now the values the call was given."""
    n, m = 4, 8
    base = torch.rand((n, m), dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device) * 0.5 + 0.25
    _, x_nat, grad, _, _ = make_inputs((n, m), torch.float64, device, scale=0.3)
    x_adv, history = base.clone(), torch.full((2, n, m), 0.3, dtype=torch.float64, device=device)
    expected, exp_history = base.clone(), history.clone()
    values = {"x_adv": (x_adv, expected), "history": (history[0], exp_history[0])}[shared]
    alpha, exp_alpha = (v.view(-1)[:n] for v in values)  # step sizes 0.25 to 0.75: the step moves every element
    eps, exp_eps = (v.view(-1)[n:2 * n] for v in values)
    reference.pgd_step_(expected, x_nat, grad, exp_alpha.clone(), exp_eps.clone(), 0.0, 1.0, norm, exp_history, 0)
    step(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 0)
    assert_verbose_equal(x_adv, expected, "x_adv")
    assert_verbose_equal(history, exp_history, "history")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shared", ["x_adv", "history"])
def test_per_sample_values_sharing_written_memory(norm, shared, device):
    check_per_sample_values_sharing_written_memory(op, norm, shared, device)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shared", ["x_nat", "grad"])
def test_history_slot_sharing_memory_with_x_nat_or_grad(norm, shared, device):
    """history[slot] one sample past x_nat (or grad) in one buffer: the slot of sample s is x_nat[s + 1]. Every value
    is read before the slot is written, as in the reference; a kernel writing the slot directly overwrote x_nat[s + 1]
    (grad[s + 1]) before that sample read it (mutation testing: dropping the slot's overlap check survived)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 5), device=device)
    buf = torch.cat([{"x_nat": x_nat, "grad": grad}[shared], torch.rand((1, 3, 5), device=device)])
    exp_buf = buf.clone()
    args = {"x_nat": x_nat, "grad": grad}
    expected = x_adv.clone()
    reference.pgd_step_(expected, **{**args, shared: exp_buf[:-1]}, alpha=alpha, eps=eps, clip_min=0.0, clip_max=1.0,
                        norm=norm, history=exp_buf[1:].unsqueeze(0), slot=0)
    op(x_adv, *{**args, shared: buf[:-1]}.values(), alpha, eps, 0.0, 1.0, norm, buf[1:].unsqueeze(0), 0)
    assert_verbose_equal(x_adv, expected, "x_adv")
    assert_verbose_equal(buf, exp_buf, "buffer")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_history_slot_interleaved_with_x_adv_holds_the_step(norm, device):
    """A strided slot sharing every other element with a contiguous x_adv (not dense: ATen's overlap test cannot judge
    the pair, so it is not refused): x_adv is written, then the slot, as in the reference. The kernels copied the slot
    from x_adv itself after writing it, reading elements the copy had already overwritten, so slot elements took
    other positions' values (found by the ops fuzzer; the Triton launcher had the same fault)."""
    buf = torch.rand(32, dtype=torch.float64, device=device)
    _, x_nat, grad, alpha, eps = make_inputs((1, 16), torch.float64, device, scale=0.3)
    expected_buf = buf.clone()
    reference.pgd_step_(expected_buf[2:18].view(1, 16), x_nat, grad, alpha, eps, 0.0, 1.0, norm,
                        expected_buf[0:32:2].view(1, 1, 16), 0)
    op(buf[2:18].view(1, 16), x_nat, grad, alpha, eps, 0.0, 1.0, norm, buf[0:32:2].view(1, 1, 16), 0)
    assert_verbose_equal(buf, expected_buf, "buffer")


@pytest.mark.parametrize("norm", NORMS)
def test_parallel_chunks_split_a_sample_between_threads(norm):
    """Two threads (the suite runs on one under OMP_NUM_THREADS=1): 5 * 13001 elements make two chunks of the CPU
    kernel's 32768 grain, the first ending inside sample 2. Each chunk must stop at its own end with that sample's
    alpha/eps: a run that went on to the end of the sample stepped the rest of it twice (mutation testing: no other
    test had more than one chunk)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        inputs = make_inputs((5, 13001), seed=4)
        (ours, h_ours), (ref, _) = run_both(*inputs, (0.0, 1.0), norm, torch.zeros((1, 5, 13001)), 0)
    finally:
        torch.set_num_threads(threads)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours[0], ref, "history")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch(norm, device):
    for shape in [(0, 3, 4, 4), (2, 0)]:
        x = torch.zeros(shape, device=device)
        alpha = torch.full((shape[0],), 0.1, device=device)
        op(x, x.clone(), x.clone(), alpha, alpha, 0.0, 1.0, norm, torch.zeros((2,) + shape, device=device), 1)


# ---------------------------------------------------------------------------------------------------------------------
# Zero gradients, eps = 0 (no NaN)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_gradient_sample_stays_put(dtype, norm, device):
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 6, 6), dtype, device, zero_grad=(1, 3), scale=0.01)
    eps.fill_(1.0)  # x_adv lies inside the ball: a zero step leaves it where it is
    before = x_adv.clone()
    op(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, None, 0)
    assert not bool(torch.isnan(x_adv).any())
    # Up to the rounding of x_nat + (x - x_nat), which the eager chain (and torchattacks) performs too: one ulp.
    ulp = torch.finfo(dtype).eps
    for i in (1, 3):
        torch.testing.assert_close(x_adv[i], before[i], rtol=0, atol=ulp)
    assert not torch.equal(x_adv[0], before[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_projects_onto_x_nat(dtype, norm, device):
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 2, 5, 5), dtype, device, zero_grad=(2,))
    eps.zero_()
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm)
    assert_verbose_equal(ours, ref)
    assert_verbose_equal(ours, x_nat)
    # Zero delta and eps = 0 together (x_adv already at x_nat, zero gradient): no 0/0, in the kernel and in the
    # reference (whose zero-delta case no other test reached: mutation pass, 2026-12-01).
    for step in (op, reference.pgd_step_):
        ours = x_nat.clone()
        step(ours, x_nat, torch.zeros_like(grad), alpha, eps, 0.0, 1.0, norm, None, 0)
        assert_verbose_equal(ours, x_nat)


# ---------------------------------------------------------------------------------------------------------------------
# float16 / bfloat16: float opmath, compared with the reference within the dtype's tolerance


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_reduced_precision_close_to_reference(dtype, norm, device):
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 9, 7), dtype, device, scale=0.02, zero_grad=(2,))
    history = torch.zeros((2,) + tuple(x_adv.shape), dtype=dtype, device=device)
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, 0)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol["rtol"], atol=2 * tol["atol"])
    assert_verbose_equal(h_ours[0], ours)
    # And against float64 arithmetic on the same inputs.
    exact = x_adv.double()
    reference.pgd_step_(exact, x_nat.double(), grad.double(), alpha.double(), eps.double(), 0.0, 1.0, norm)
    torch.testing.assert_close(ours.double(), exact, rtol=tol["rtol"], atol=2 * tol["atol"])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("with_history", [False, True], ids=["no_history", "history"])
def test_reference_keeps_an_alpha_beyond_the_dtype_in_opmath(dtype, norm, with_history, device):
    """An alpha the dtype cannot hold (>= 65520 in float16) stays float32 in the reference as in the kernels: rounded
    to the dtype it was inf, and inf * sign(0) (L2: inf * 0 / ||0||) turned zero-gradient elements to NaN, which the
    kernels leave finite."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 5, 5), dtype, device, scale=0.02, zero_grad=(2,))
    grad[0, 0, 0] = 0  # zero-gradient elements in a sample that steps too
    alpha = torch.full_like(alpha, 65520.0 if dtype == torch.float16 else 3.4e38)
    history = torch.zeros((2,) + tuple(x_adv.shape), dtype=dtype, device=device) if with_history else None
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, 1)
    assert ours.isfinite().all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ref.float(), ours.float(), rtol=tol["rtol"], atol=2 * tol["atol"])
    if with_history:
        assert_verbose_equal(h_ref[1], ref)


def check_clip_bounds_beyond_the_dtype(step_op, dtype, norm, device="cpu"):
    """A clip bound the dtype's opmath cannot hold (1e5 in float16, 1e39 in bfloat16 and float32) is rounded to inf,
    as the C++ kernels' static_cast: backend="reference" clamped with the Python bound and raised torch's "value
    cannot be converted to type c10::Half without overflow" (naming neither the op nor the bound), and the Triton
    launcher's torch.full of the bounds "... to type float without overflow" for 1e39."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 5, 4), dtype, device, clip=(-2.0, 2.0), scale=0.02)
    big = 1e5 if dtype == torch.float16 else 1e39
    for clip in ((-big, big), (-1.0, big), (-big, 1.0)):
        ours, ref = x_adv.clone(), x_adv.clone()
        step_op(ours, x_nat, grad, alpha, eps, *clip, norm, None, 0)
        robust_ops.pgd_step_(ref, x_nat, grad, alpha, eps, clip_min=clip[0], clip_max=clip[1], norm=norm,
                             backend="reference")
        if dtype == torch.float32:
            assert_verbose_equal(ours, ref)
            continue
        # float32 rounds a bound of 1e39 to inf (the chain's Python-float clamp would raise on it)
        rounded = tuple(math.copysign(math.inf, c) if abs(c) > 1e38 else c for c in clip)
        assert_verbose_equal(ours, opmath_chain(x_adv, x_nat, grad, alpha, eps, rounded, norm))
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(ours.float(), ref.float(), rtol=tol["rtol"], atol=2 * tol["atol"])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", NORMS)
def test_clip_bounds_beyond_the_dtype(dtype, norm, device):
    check_clip_bounds_beyond_the_dtype(op, dtype, norm, device)


def test_clip_bounds_round_to_float32_as_numpy_does():
    """reference.clip_bounds rounds in plain Python (so torch.compile(fullgraph=True) traces the chain, which numpy's
    np.errstate prevented): the same float32 as numpy's cast -- ties to even, subnormals, -0.0, overflow to inf --
    over edge values and random bit patterns."""
    import struct

    import numpy as np

    top = 3.4028234663852886e38  # float32's largest finite value; its half ulp is 2**103
    values = [0.0, -0.0, 1.0, 0.1, -1 / 3, 1e39, -1e39, 1e5, top, top + 2.0 ** 102, top + 2.0 ** 103,
              -(top + 2.0 ** 103), 2.0 ** -149, 2.0 ** -150, 3 * 2.0 ** -150, -2.0 ** -151, 2.0 ** -126,
              2.0 ** -126 - 2.0 ** -150, 1 + 2.0 ** -24, 1 + 3 * 2.0 ** -24, math.inf, -math.inf, 5e-324]
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (20000,), generator=gen, dtype=torch.int64).tolist()
    values += [v for v in (struct.unpack("<d", struct.pack("<q", b))[0] for b in bits) if v == v]
    values += torch.randn(2000, generator=gen, dtype=torch.float64).tolist()
    for v in values:
        low, high, opmath = reference.clip_bounds(v, -v, torch.float32)
        with np.errstate(over="ignore"):
            want = (float(np.float32(v)), float(np.float32(-v)))
        assert opmath == torch.float32
        for got, expected in zip((low, high), want):
            assert got == expected and math.copysign(1, got) == math.copysign(1, expected), (v, got, expected)
    assert math.isnan(reference.clip_bounds(math.nan, 0, torch.float32)[0])
    assert reference.clip_bounds(1e39, 0.1, torch.float64) == (1e39, 0.1, torch.float64)


@pytest.mark.parametrize("norm", NORMS)
def test_reference_chain_compiles_fullgraph(norm):
    """reference.pgd_step_ itself (no argument checks; what bench_pgd_step's `compiled` provider compiles) under
    torch.compile(fullgraph=True), equal to eager, a bound beyond float32 included."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 5, 4))
    history = torch.zeros((2,) + x_adv.shape)
    compiled, eager = x_adv.clone(), x_adv.clone()
    torch._dynamo.reset()
    try:
        torch.compile(reference.pgd_step_, fullgraph=True, backend="eager")(
            compiled, x_nat, grad, alpha, eps, 0.0, 1e39, norm, history, 1)
    finally:
        torch._dynamo.reset()
    reference.pgd_step_(eager, x_nat, grad, alpha, eps, 0.0, 1e39, norm)
    assert_verbose_equal(compiled, eager)
    assert_verbose_equal(history[1], eager)


def opmath_chain(x, x_nat, g, alpha, eps, clip, norm):
    """docs/ops/pgd_step.md for float16/bfloat16, written out: each elementwise op in float32, its result rounded to
    the storage dtype; alpha, eps, the norms and the L2 factors stay float32."""
    dt, f = x.dtype, torch.float32
    view = (-1,) + (1,) * (x.dim() - 1)
    a, e = alpha.to(f).view(view), eps.to(f).view(view)
    if norm == "linf":
        step = (a * g.to(f).sign()).to(dt)
        stepped = (x.to(f) + step.to(f)).to(dt)
        diff = (stepped.to(f) - x_nat.to(f)).to(dt)
        moved = (x_nat.to(f) + torch.clamp(diff.to(f), -e, e)).to(dt)
    else:
        n = x.shape[0]
        grad_norm = torch.linalg.vector_norm(g.reshape(n, -1), 2, dim=1, dtype=f) + 1e-10
        unit = (g.to(f) / grad_norm.view(view)).to(dt)
        stepped = (x.to(f) + (a * unit.to(f)).to(dt).to(f)).to(dt)
        delta = (stepped.to(f) - x_nat.to(f)).to(dt)
        delta_norm = torch.linalg.vector_norm(delta.reshape(n, -1), 2, dim=1, dtype=f)
        factor = torch.minimum(delta_norm.reciprocal() * eps.to(f), torch.ones_like(delta_norm))
        factor = torch.where(eps.to(f) == 0, torch.zeros_like(factor), factor)
        scaled = (delta.to(f) * factor.view(view)).to(dt)
        moved = (x_nat.to(f) + scaled.to(f)).to(dt)
    return moved.to(f).clamp(*clip).to(dt)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_reduced_precision_rounds_each_intermediate(dtype, norm, device):
    """Bitwise: every intermediate (step, stepped, difference, scaled delta, moved) is rounded to the dtype; on CUDA
    too (the chain's ops run there with IEEE division and no contraction across ops, as the kernel's --fmad=false)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((6, 3, 16, 16), dtype, device, scale=0.02, zero_grad=(2,))
    expected = opmath_chain(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm)
    ours = x_adv.clone()
    op(ours, x_nat, grad, alpha, eps, 0.0, 1.0, norm, None, 0)
    assert_verbose_equal(ours, expected)
    assert not torch.equal(ours, x_adv)


# ---------------------------------------------------------------------------------------------------------------------
# Bitwise parity with the torchattacks 3.5.1 expression chains (PGD / PGDL2 step, Python-float alpha and eps)


def torchattacks_pgd_step(adv_images, images, grad, alpha, eps):
    adv_images = adv_images.detach() + alpha * grad.sign()
    delta = torch.clamp(adv_images - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1).detach()


def torchattacks_pgdl2_step(adv_images, images, grad, alpha, eps):
    batch_size = len(images)
    grad_norms = torch.norm(grad.view(batch_size, -1), p=2, dim=1) + 1e-10
    grad = grad / grad_norms.view(batch_size, 1, 1, 1)
    adv_images = adv_images.detach() + alpha * grad
    delta = adv_images - images
    delta_norms = torch.norm(delta.view(batch_size, -1), p=2, dim=1)
    factor = eps / delta_norms
    factor = torch.min(factor, torch.ones_like(delta_norms))
    delta = delta * factor.view(-1, 1, 1, 1)
    return torch.clamp(images + delta, min=0, max=1).detach()


@pytest.mark.parametrize("norm,alpha,eps", [("linf", 2 / 255, 8 / 255), ("linf", 0.001, 5 / 255),
                                            ("l2", 0.2, 1.0), ("l2", 0.1, 0.3)])
def test_bitwise_equal_to_torchattacks_chain(norm, alpha, eps):
    x_adv, x_nat, grad, _, _ = make_inputs((6, 3, 12, 12), scale=0.02, zero_grad=(4,))
    chain = torchattacks_pgd_step if norm == "linf" else torchattacks_pgdl2_step
    expected = x_adv
    ours = x_adv.clone()
    for _ in range(4):  # several steps, so projection and clipping are active
        expected = chain(expected, x_nat, grad, alpha, eps)
        robust_ops.pgd_step_(ours, x_nat, grad, alpha, eps, norm=norm, backend="native")
        assert_verbose_equal(ours, expected)
        grad = torch.randn_like(grad)


# ---------------------------------------------------------------------------------------------------------------------
# Functional wrapper, opcheck, torch.compile


def test_functional_wrapper_scalars_and_backends():
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 4, 4))
    for norm in NORMS:
        native, ref = x_adv.clone(), x_adv.clone()
        history = torch.zeros((2,) + tuple(x_adv.shape))
        out = robust_ops.pgd_step_(native, x_nat, grad, 0.01, eps, norm=norm, history=history, slot=1,
                                   backend="native")
        assert out is native
        robust_ops.pgd_step_(ref, x_nat, grad, torch.tensor(0.01), eps, norm=norm, backend="reference")
        assert_verbose_equal(native, ref)
        assert_verbose_equal(history[1], ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_opcheck(device, with_history, norm):
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 4, 4), device=device)
    history = torch.zeros((2,) + tuple(x_adv.shape), device=device) if with_history else None
    torch.library.opcheck(op, (x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1))


def _attack_steps(x_adv, x_nat, grad, alpha, eps, history):
    for slot in range(2):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad * (slot + 1), alpha, eps, 0.0, 1.0, "linf", history, slot)
    return x_adv


def _check_compiled(backend):
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4, 4))
    compiled = torch.compile(_attack_steps, fullgraph=True, backend=backend)
    h_eager = torch.zeros((2,) + tuple(x_adv.shape))
    h_comp = h_eager.clone()
    eager = _attack_steps(x_adv.clone(), x_nat, grad, alpha, eps, h_eager)
    x_comp = x_adv.clone()
    out = compiled(x_comp, x_nat, grad, alpha, eps, h_comp)
    assert_verbose_equal(out, eager)
    assert_verbose_equal(x_comp, eager, "x_adv mutated in place under compile")
    assert_verbose_equal(h_comp, h_eager, "history")


def test_compile_fullgraph():
    """Dynamo + functionalization (auto_functionalized) + the fake kernel, without code generation."""
    _check_compiled("aot_eager")


def test_functional_with_tensor_alpha_and_eps_compiles_fullgraph():
    """The functional wrapper's dtype check of a per-sample alpha/eps tensor is traceable: its torch._check message
    closed over the tensor, which Dynamo refuses ("Can't convert torch._check*() message closure"), so
    robust_ops.pgd_step_ with tensor alpha/eps failed under torch.compile(fullgraph=True)."""

    def step(x_adv, x_nat, grad, alpha, eps):
        robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm="l2")
        return x_adv

    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 4, 4))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")(x_adv.clone(), x_nat, grad, alpha, eps)
    assert_verbose_equal(compiled, step(x_adv.clone(), x_nat, grad, alpha, eps))
    torch._dynamo.reset()


def test_reference_backend_compiles_with_graph_breaks_only():
    """docs/ops/pgd_step.md: backend="reference" (the eager chain) compiles without fullgraph, equal to eager; with
    fullgraph=True Dynamo refuses its shape-naming checks (the native and Triton variants compile fullgraph)."""

    def step(x_adv, x_nat, grad):
        robust_ops.pgd_step_(x_adv, x_nat, grad, 0.1, 0.01, norm="linf", backend="reference")
        return x_adv

    x, grad = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch._dynamo.reset()
    assert_verbose_equal(torch.compile(step, backend="eager")(x.clone(), x, grad), step(x.clone(), x, grad))
    torch._dynamo.reset()
    # Dynamo's wording: torch 2.14 "Can't convert torch._check...", 2.11 (the GPU machines' image, where this failed
    # on 2026-12-04) "Can't extract message from torch._check()"
    with pytest.raises(Exception, match=r"Can't (convert|extract message from) torch\._check"):
        torch.compile(step, fullgraph=True, backend="eager")(x.clone(), x, grad)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    """The same through inductor (about 10-20 s of C++ code generation on 2 cores)."""
    _check_compiled("inductor")


# ---------------------------------------------------------------------------------------------------------------------
# Errors: the C++ messages are exactly those of the fake kernel's checks (robust_ops/_meta.py)


def _good_args(shape=(2, 3, 4)):
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape)
    return dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps, clip_min=0.0, clip_max=1.0, norm="linf",
                history=torch.zeros((2,) + shape), slot=0)


BAD_ARGS = {
    "x_adv dtype": (dict(x_adv=torch.zeros((2, 3, 4), dtype=torch.int64)),
                    "expected x_adv to be a floating-point tensor (float16, bfloat16, float32, float64), "
                    "got torch.int64"),
    "x_adv 0-D": (dict(x_adv=torch.tensor(0.5)), "expected x_adv to have a batch dimension, got a 0-D tensor"),
    "x_nat shape": (dict(x_nat=torch.zeros((2, 3, 5))),
                    "expected x_nat to have the shape of x_adv (2, 3, 4), got (2, 3, 5)"),
    "x_nat dtype": (dict(x_nat=torch.zeros((2, 3, 4), dtype=torch.float64)),
                    "expected x_nat to have the dtype of x_adv (torch.float32), got torch.float64"),
    "grad shape": (dict(grad=torch.zeros((6,))),
                   "expected grad to have the shape of x_adv (2, 3, 4), got (6,)"),
    "grad dtype": (dict(grad=torch.zeros((2, 3, 4), dtype=torch.float16)),
                   "expected grad to have the dtype of x_adv (torch.float32), got torch.float16"),
    "alpha shape": (dict(alpha=torch.zeros(())),
                    "expected alpha to be a 1-D tensor of 2 per-sample values, got shape ()"),
    "alpha length": (dict(alpha=torch.zeros(3)),
                     "expected alpha to be a 1-D tensor of 2 per-sample values, got shape (3,)"),
    "alpha dtype": (dict(alpha=torch.zeros(2, dtype=torch.int32)),
                    "expected alpha to be a floating-point tensor (float16, bfloat16, float32, float64), "
                    "got torch.int32"),
    "eps shape": (dict(eps=torch.zeros((2, 1))),
                  "expected eps to be a 1-D tensor of 2 per-sample values, got shape (2, 1)"),
    "eps dtype": (dict(eps=torch.zeros(2, dtype=torch.bool)),
                  "expected eps to be a floating-point tensor (float16, bfloat16, float32, float64), got torch.bool"),
    # float8 passed at::isFloatingType: eager and the fake kernel disagreed
    "x_adv float8": (dict(x_adv=torch.zeros((2, 3, 4), dtype=torch.float8_e5m2)),
                     "expected x_adv to be a floating-point tensor (float16, bfloat16, float32, float64), "
                     "got torch.float8_e5m2"),
    "alpha float8": (dict(alpha=torch.zeros(2, dtype=torch.float8_e4m3fn)),
                     "expected alpha to be a floating-point tensor (float16, bfloat16, float32, float64), "
                     "got torch.float8_e4m3fn"),
    "clip order": (dict(clip_min=1.0, clip_max=0.0), "expected clip_min <= clip_max, got clip_min=1.0, clip_max=0.0"),
    "clip repr": (dict(clip_min=0.30000000000000004, clip_max=1e-05),
                  "expected clip_min <= clip_max, got clip_min=0.30000000000000004, clip_max=1e-05"),
    "clip nan": (dict(clip_min=float("nan")), "expected clip_min <= clip_max, got clip_min=nan, clip_max=1.0"),
    "norm": (dict(norm="l1"), "expected norm to be 'linf' or 'l2', got 'l1'"),
    # the op is the low-level contract: only the attacks' Python API takes AutoAttack's 'Linf' / 'L2'
    "norm capitalised": (dict(norm="Linf"), "expected norm to be 'linf' or 'l2', got 'Linf'"),
    "history shape": (dict(history=torch.zeros((2, 2, 3, 5))),
                      "expected history to have shape [m, 2, 3, 4], got (2, 2, 3, 5)"),
    "history rank": (dict(history=torch.zeros((2, 3, 4))),
                     "expected history to have shape [m, 2, 3, 4], got (2, 3, 4)"),
    # the leading sizes right, one trailing size-1 dimension more (mutation testing: a rank check >= survived)
    "history rank high": (dict(history=torch.zeros((2, 2, 3, 4, 1))),
                          "expected history to have shape [m, 2, 3, 4], got (2, 2, 3, 4, 1)"),
    "history dtype": (dict(history=torch.zeros((2, 2, 3, 4), dtype=torch.float64)),
                      "expected history to have the dtype of x_adv (torch.float32), got torch.float64"),
    "slot high": (dict(slot=2), "expected slot in [0, 2) for a history of 2 slots, got 2"),
    "slot negative": (dict(slot=-1), "expected slot in [0, 2) for a history of 2 slots, got -1"),
    "history overlap": (dict(history=torch.zeros((2, 1, 3, 4)).expand(2, 2, 3, 4)),
                        "expected history without internal overlap (more than one element of the written-to tensor "
                        "refers to a single memory location); clone() it first"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_error_messages_match_fake_checks(case):
    changes, message = BAD_ARGS[case]
    args = {**_good_args(), **changes}
    with pytest.raises(RuntimeError) as fake_err:
        check_pgd_step_args(**args)
    with pytest.raises(RuntimeError) as native_err:
        op(*args.values())
    assert str(fake_err.value) == "pgd_step_: " + message
    assert str(native_err.value) == "pgd_step_: " + message


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("norm", [None, 2, "l1", np.array(["linf", "l2"])])
def test_functional_refuses_a_norm_alike_on_every_backend(backend, norm):
    """robust_ops.pgd_step_ names the op and its norm on every backend (test_pgd_step_triton.py: the interpreted
    Triton one), before anything is written: a norm that is not a string (None) got the native and Triton schemas'
    "robust_ops::pgd_step_() Expected a value of type 'str' for argument 'norm' but instead found type 'NoneType'.",
    the reference backend its own message; an array of the names numpy's "The truth value of an array with more than
    one element is ambiguous" on every backend after that."""
    args = _good_args()
    x_adv, history = args["x_adv"], args["history"]
    before = x_adv.clone()
    with pytest.raises(RuntimeError) as err:
        robust_ops.pgd_step_(x_adv, args["x_nat"], args["grad"], args["alpha"], args["eps"], norm=norm,
                             history=history, backend=backend)
    assert str(err.value) == f"pgd_step_: expected norm to be 'linf' or 'l2', got {norm!r}"
    assert torch.equal(x_adv, before) and not history.any()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("vmapped", ["x_adv", "grad", "alpha"])
def test_vmap_is_refused_by_name_on_every_backend(backend, vmapped):
    """The op has no batching rule: under torch.func.vmap the functional form names the vmapped argument on every
    backend (test_pgd_step_triton.py: the Triton one), before anything is written. Each backend failed in its own
    words: "Batching rule not implemented for robust_ops::pgd_step_" (native), "... for
    aten::_debug_has_internal_overlap" (reference), torch's in-place refusal where only grad was vmapped."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4))
    batched = dict(x_adv=torch.stack([x_adv, x_adv]), grad=torch.stack([grad, -grad]), alpha=torch.stack([alpha] * 2))
    args = dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha)
    args[vmapped] = batched[vmapped]
    before = args["x_adv"].clone()

    def step(value):
        call = {**args, vmapped: value}
        robust_ops.pgd_step_(call["x_adv"], call["x_nat"], call["grad"], call["alpha"], eps, backend=backend)
        return value

    with pytest.raises(RuntimeError) as err:
        torch.func.vmap(step)(args[vmapped])
    assert str(err.value) == (
        f"pgd_step_: expected {vmapped} outside torch.func.vmap, got a tensor vmapped over; the op has no batching "
        "rule and works per sample already: fold the vmapped dimension into the batch (N) dimension and call it once")
    assert torch.equal(args["x_adv"], before)


@pytest.mark.parametrize(
    "name,values,message",
    [
        ("eps", [0.1, -0.5], "expected eps >= 0 for every sample, got eps[1]=-0.5"),
        ("eps", [float("nan"), 0.1], "expected eps >= 0 for every sample, got eps[0]=nan"),
        ("alpha", [float("inf"), 0.1], "expected alpha to be finite for every sample, got alpha[0]=inf"),
        ("alpha", [0.1, float("nan")], "expected alpha to be finite for every sample, got alpha[1]=nan"),
    ],
)
def test_data_dependent_checks(name, values, message):
    args = {**_good_args(), name: torch.tensor(values)}
    before = args["x_adv"].clone()  # taken before the call (it used to be taken after, comparing x_adv with itself)
    with pytest.raises(RuntimeError, match="^pgd_step_: " + message.replace("[", r"\[").replace("]", r"\]") + "$"):
        op(*args.values())
    assert torch.equal(args["x_adv"], before), "a rejected call must not modify x_adv"
    assert not args["history"].any(), "a rejected call must not write the history slot"


def test_boundary_values_are_accepted():
    """clip_min == clip_max and eps = 0 are valid (the checks are <= and >=, not < and >), by the fake kernel's checks,
    the kernel and backend="reference"; found untested by the mutation pass (2026-12-01)."""
    args = {**_good_args(), "clip_min": 0.5, "clip_max": 0.5}
    check_pgd_step_args(**args)
    check_pgd_step_values(args["alpha"], torch.zeros(2), torch.float32)
    for backend in ("native", "reference"):
        for norm in NORMS:
            x_adv = args["x_adv"].clone()
            robust_ops.pgd_step_(x_adv, args["x_nat"], args["grad"], args["alpha"], 0.0, clip_min=0.5, clip_max=0.5,
                                 norm=norm, backend=backend)
            assert bool((x_adv == 0.5).all()), (backend, norm)


def test_value_checks_use_the_opmath_dtype_of_x_adv():
    """check_pgd_step_values (the Triton launcher's and backend="reference"'s value check) converts alpha to the
    opmath dtype of x_adv as the CPU kernel does: a float64 alpha of 1e39 is inf for float32 / float16 inputs, finite
    for float64 ones. The functional wrapper converts alpha itself, so only a direct call shows the conversion."""
    alpha, eps = torch.tensor([1e39, 0.1], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"^pgd_step_: expected alpha to be finite for every sample, got "
                                               r"alpha\[0\]=inf$"):
            check_pgd_step_values(alpha, eps, dtype)
    check_pgd_step_values(alpha, eps, torch.float64)
    with pytest.raises(RuntimeError, match=r"^pgd_step_: expected eps >= 0 for every sample, got eps\[1\]=-1e-300$"):
        check_pgd_step_values(alpha[[1, 1]], torch.tensor([0.0, -1e-300], dtype=torch.float64), torch.float64)


@pytest.mark.parametrize(
    "name,values,message",
    [
        ("eps", [0.1, -0.5], "expected eps >= 0 for every sample, got eps[1]=-0.5"),
        ("eps", [float("nan"), 0.1], "expected eps >= 0 for every sample, got eps[0]=nan"),
        ("alpha", [float("inf"), 0.1], "expected alpha to be finite for every sample, got alpha[0]=inf"),
        ("alpha", [1e39, 0.1], "expected alpha to be finite for every sample, got alpha[0]=inf"),
    ],
)
@pytest.mark.parametrize("norm", NORMS)
def test_reference_backend_checks_values_like_the_cpu_kernel(name, values, message, norm):
    """backend="reference" used to skip the CPU kernels' value checks: a negative or NaN eps stepped (NaN output)."""
    args = _good_args()
    per_sample = {"alpha": args["alpha"], "eps": args["eps"], name: torch.tensor(values, dtype=torch.float64)}
    for backend in ("native", "reference"):
        x_adv = args["x_adv"].clone()
        with pytest.raises(RuntimeError) as err:
            robust_ops.pgd_step_(x_adv, args["x_nat"], args["grad"], per_sample["alpha"], per_sample["eps"],
                                 norm=norm, backend=backend)
        assert str(err.value) == "pgd_step_: " + message, backend
        assert torch.equal(x_adv, args["x_adv"]), backend


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    "changes,error,message",
    [
        (dict(x_adv=torch.tensor(0.5)), RuntimeError, "expected x_adv to have a batch dimension, got a 0-D tensor"),
        (dict(slot=1.5), TypeError, "expected slot to be an int, got 1.5"),
        (dict(slot=torch.tensor(1.0)), TypeError, "expected slot to be an int, got tensor(1.)"),
        (dict(slot=True), TypeError, "expected slot to be an int, got True"),  # a bool is not a slot number
        (dict(alpha=True), TypeError, "expected alpha to be a number or a tensor, got bool"),  # nor a step of 1.0
        # per-sample values for another batch (2 samples here) or not 1-D: no test reached the refusal
        (dict(alpha=torch.full((3,), 0.1)), ValueError, "expected alpha to be a scalar or a tensor of shape [2], got "
                                                          "shape (3,)"),
        (dict(eps=torch.full((2, 1), 0.3)), ValueError, "expected eps to be a scalar or a tensor of shape [2], got "
                                                          "shape (2, 1)"),
        (dict(clip_min=None), TypeError, "expected clip_min to be a number, got NoneType"),
        (dict(clip_max="1"), TypeError, "expected clip_max to be a number, got str"),
        (dict(clip_min=False), TypeError, "expected clip_min to be a number, got bool"),  # not a bound of 0.0
        # a 0-D bool tensor ran as 1.0 (a Python bool is refused)
        (dict(clip_max=torch.tensor(True)), TypeError, "expected clip_max to be a number, got a torch.bool tensor"),
        (dict(clip_min=torch.tensor(0j)), TypeError, "expected clip_min to be a number, got a torch.complex64 tensor"),
        # backend="reference" raised AttributeError ('list' object has no attribute 'shape'), naming no argument
        (dict(x_nat=[0.5]), TypeError, "expected x_nat to be a tensor, got list"),
        (dict(grad=0.5), TypeError, "expected grad to be a tensor, got float"),
        (dict(history=[0.5]), TypeError, "expected history to be a tensor or None, got list"),
    ],
)
def test_functional_argument_errors(backend, changes, error, message):
    """One-line errors naming the argument: a 0-D x_adv used to fail with an IndexError, slot=1.5 silently wrote slot
    1 (int(1.5)), clip_min=None raised float()'s TypeError."""
    args = {**_good_args(), **changes}
    x_adv = args.pop("x_adv")
    with pytest.raises(error) as err:
        robust_ops.pgd_step_(x_adv, args.pop("x_nat"), args.pop("grad"), args.pop("alpha"), args.pop("eps"), **args,
                             backend=backend)
    assert str(err.value) == "pgd_step_: " + message


@pytest.mark.parametrize("norm", NORMS)
def test_reference_empty_batch(norm):
    """The reference's L2 norms used grad.reshape(0, -1), an error for an empty batch (the kernels return)."""
    x = torch.zeros((0, 3, 4))
    alpha = torch.zeros(0)
    for backend in ("native", "reference"):
        robust_ops.pgd_step_(x, x.clone(), x.clone(), alpha, alpha, norm=norm, history=torch.zeros((2, 0, 3, 4)),
                             slot=1, backend=backend)


def test_reference_refuses_an_unknown_norm_by_name():
    """reference.pgd_step_ called directly (the oracle that tests and benchmarks import) names the op and the norm,
    before writing; without its own check an unknown norm took neither branch and failed with UnboundLocalError
    (mutation pass, 2026-12-04)."""
    args = {**_good_args(), "norm": "Linf"}
    x_adv = args.pop("x_adv")
    before = x_adv.clone()
    with pytest.raises(ValueError, match=r"^pgd_step_: expected norm to be 'linf' or 'l2', got 'Linf'$"):
        reference.pgd_step_(x_adv, **args)
    assert torch.equal(x_adv, before)


def test_alpha_overflowing_the_dtype_is_rejected():
    args = {**_good_args(), "alpha": torch.tensor([1e39, 0.1], dtype=torch.float64)}
    with pytest.raises(RuntimeError,
                       match=r"pgd_step_: expected alpha to be finite for every sample, got alpha\[0\]=inf"):
        op(*args.values())


def test_overlapping_history_is_rejected_before_any_write():
    """An expanded history (its slots share memory) is refused, like the fake kernel, before x_adv changes."""
    args = {**_good_args(), "history": torch.zeros((1, 2, 3, 4)).expand(2, 2, 3, 4)}
    before = args["x_adv"].clone()
    message = "pgd_step_: expected history without internal overlap"
    with pytest.raises(RuntimeError, match=message) as native_err:
        op(*args.values())
    with pytest.raises(RuntimeError) as fake_err:
        check_pgd_step_args(**args)
    assert str(native_err.value) == str(fake_err.value)
    assert torch.equal(args["x_adv"], before)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_history_slot_partly_overlapping_x_adv_is_rejected_before_any_write(norm, backend):
    """history[slot] sharing part of x_adv's memory (x_adv = buf[1:], history[0] = buf[:3]): the kernel wrote x_adv,
    then failed in the copy to the slot with ATen's "unsupported operation: some elements of the input tensor and the
    written-to tensor refer to a single memory location" (the reference wrote both, the slot over part of the step).
    Refused first now, with one message on every path; a slot that is x_adv itself still works."""
    buf = torch.rand((4, 3, 4))
    x_adv, history = buf[1:], buf[:3].unsqueeze(0)
    _, x_nat, grad, alpha, eps = make_inputs((3, 3, 4))
    before = buf.clone()
    message = (r"pgd_step_: expected history\[0\] to be x_adv itself or apart from it, got a slot that partly overlaps "
               r"x_adv; clone\(\) one of them first")
    with pytest.raises(RuntimeError, match=message):
        robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm=norm, history=history, slot=0, backend=backend)
    assert torch.equal(buf, before)
    with pytest.raises(RuntimeError, match=message):
        check_pgd_step_args(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 0)
    # the same span with other strides is a partial overlap too (ATen's rule); x_adv itself as the slot is not
    square = torch.rand((3, 3))
    with pytest.raises(RuntimeError, match=message):
        robust_ops.pgd_step_(square, torch.rand(3, 3), torch.rand(3, 3), alpha, eps, norm=norm,
                             history=square.t().unsqueeze(0), slot=0, backend=backend)
    expected = x_adv.clone()
    reference.pgd_step_(expected, x_nat, grad, alpha, eps, 0.0, 1.0, norm, None, 0)
    robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm=norm, history=x_adv.unsqueeze(0), slot=0,
                         backend=backend)
    assert torch.equal(x_adv, expected)


def test_partly_overlaps_follows_atens_overlap_status():
    from robust_ops._meta import partly_overlaps

    buf = torch.zeros(10)
    assert partly_overlaps(buf[0:3], buf[2:5]) and not partly_overlaps(buf[0:3], buf[3:6])
    assert not partly_overlaps(buf[2:5], buf[2:5]) and not partly_overlaps(buf, torch.zeros(10))
    assert not partly_overlaps(buf[:0], buf) and not partly_overlaps(buf[::2], buf[:5])  # empty; not dense: TooHard
    m = torch.zeros(3, 3)
    assert partly_overlaps(m, m.t()) and not partly_overlaps(m.to("meta"), m.to("meta"))
    # A size-1 dimension's stride does not matter for density, as in ATen's is_non_overlapping_and_dense: one row
    # taken with a step (strides (10, 1)) is dense, so its partial overlap is found, as the native kernels find it
    # (counted as TooHard, the Triton launcher and the fake kernel accepted what the native op refuses).
    row = buf.view(2, 5)[::2]
    assert partly_overlaps(row, buf[2:7].view(1, 5)) and not partly_overlaps(row, buf[5:].view(1, 5))


def test_overlapping_x_adv_is_rejected():
    args = {**_good_args(), "x_adv": torch.zeros((1, 3, 4)).expand(2, 3, 4)}
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        op(*args.values())


@pytest.mark.needs_cuda
def test_device_mismatch_message():
    args = {**_good_args(), "alpha": torch.zeros(2, device="cuda")}
    with pytest.raises(RuntimeError, match=r"pgd_step_: expected alpha on the device of x_adv \(cpu\), got cuda:0"):
        op(*args.values())


def test_functional_wrapper_refuses_per_sample_values_on_another_device():
    # A [N] alpha/eps used to be copied to x_adv's device silently (meta: torch's "Cannot copy out of meta tensor").
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3))
    before = x_adv.clone()
    for name in ("alpha", "eps"):
        values = {"alpha": alpha, "eps": eps, name: torch.full((2,), 0.1, device="meta")}
        with pytest.raises(RuntimeError, match=rf"pgd_step_: expected {name} on the device of x_adv \(cpu\), got meta"):
            robust_ops.pgd_step_(x_adv, x_nat, grad, values["alpha"], values["eps"])
    assert torch.equal(x_adv, before)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("value", [torch.tensor([True, False]), torch.tensor([1, 0]), torch.tensor(1),
                                   torch.tensor([0.1j, 0.1j])], ids=["bool", "int", "int 0-D", "complex"])
def test_functional_wrapper_refuses_per_sample_values_that_are_not_floating_point(backend, value):
    # The op refuses them; the wrapper used to convert them first: a bool mask became steps of 1.0, a complex tensor
    # lost its imaginary part (with only torch's cast warning).
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3))
    before = x_adv.clone()
    for name in ("alpha", "eps"):
        values = {"alpha": alpha, "eps": eps, name: value}
        with pytest.raises(RuntimeError, match=rf"^pgd_step_: expected {name} to be a floating-point tensor "
                           rf"\(float16, bfloat16, float32, float64\), got {value.dtype}$"):
            robust_ops.pgd_step_(x_adv, x_nat, grad, values["alpha"], values["eps"], backend=backend)
    assert torch.equal(x_adv, before)


def test_functional_wrapper_forwards_backend(monkeypatch):
    requested = record_backend_requests(monkeypatch)
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3))
    for backend in ("reference", "native"):
        robust_ops.pgd_step_(x_adv.clone(), x_nat, grad, alpha, eps, backend=backend)
    assert requested == [("pgd_step_", "reference"), ("pgd_step_", "native")]


def test_zero_dim_alpha_eps_are_float32_for_half_inputs():
    # A 0-D alpha/eps becomes a per-sample float32 (opmath) value as a Python float does: 7e4 overflows float16 only.
    x_adv, x_nat, grad, _, _ = make_inputs((2, 3), dtype=torch.float16)
    a, b = x_adv.clone(), x_adv.clone()
    robust_ops.pgd_step_(a, x_nat, grad, 7e4, 0.1)
    robust_ops.pgd_step_(b, x_nat, grad, torch.tensor(7e4), torch.tensor(0.1))
    assert_verbose_equal(a, b)


def test_steps_a_leaf_that_requires_grad():
    # Attacks keep x_adv.requires_grad_() across iterations: the in-place step runs outside autograd.
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3))
    expected = x_adv.clone()
    robust_ops.pgd_step_(expected, x_nat, grad, alpha, eps)
    for backend in ("native", "reference"):
        x = x_adv.clone().requires_grad_()
        robust_ops.pgd_step_(x, x_nat, grad, alpha, eps, backend=backend)
        assert x.requires_grad and x.grad_fn is None
        assert_verbose_equal(x.detach(), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd: no gradient (tensors requiring grad refused under grad mode), version counter bumped
# (robust_ops._autograd.register_in_place_without_gradient; the Triton tests reuse these checks)

PGD_TENSOR_ARGUMENTS = ("x_adv", "x_nat", "grad", "alpha", "eps", "history")
PGD_MUTATED = ("x_adv", "history")


def pgd_step_arguments(device="cpu"):
    """The op's ten positional arguments, with a history buffer, as a dict by schema name."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device)
    history = torch.zeros((2,) + tuple(x_adv.shape), device=device)
    return dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps, clip_min=0.0, clip_max=1.0, norm="linf",
                history=history, slot=1)


def check_refuses_argument_requiring_grad(op, name, argument, device="cpu"):
    check_in_place_op_refuses_argument_requiring_grad(op, name, lambda: pgd_step_arguments(device), PGD_MUTATED,
                                                      argument)


def check_refuses_a_non_leaf_x_adv(op, name, device="cpu"):
    # It used to run, and backward then saw y as x * 2 still: x.grad was 2 everywhere, silently wrong.
    args = pgd_step_arguments(device)
    x = args["x_adv"].clone().requires_grad_()
    args["x_adv"] = x * 2
    with pytest.raises(RuntimeError, match=f"^{name}: x_adv requires grad"):
        op(*args.values())


def check_runs_without_grad_mode_and_bumps_versions(op, device="cpu"):
    check_in_place_op_runs_outside_grad_mode_and_bumps_versions(op, lambda: pgd_step_arguments(device), PGD_MUTATED)


def check_backward_sees_the_mutation(op, device="cpu"):
    check_in_place_op_mutation_is_seen_by_backward(op, lambda: pgd_step_arguments(device), "x_adv")


@pytest.mark.parametrize("argument", PGD_TENSOR_ARGUMENTS)
def test_refuses_an_argument_requiring_grad_under_grad_mode(argument):
    check_refuses_argument_requiring_grad(op, "pgd_step_", argument)


def test_refuses_a_non_leaf_x_adv():
    check_refuses_a_non_leaf_x_adv(op, "pgd_step_")


def test_runs_without_grad_mode_and_bumps_versions():
    check_runs_without_grad_mode_and_bumps_versions(op)


def test_backward_sees_the_mutation():
    check_backward_sees_the_mutation(op)


def test_a_rejected_call_bumps_no_version():
    check_in_place_op_rejected_call_bumps_no_version(op, pgd_step_arguments, PGD_MUTATED,
                                                     {"eps": torch.full((2,), -1.0)}, "expected eps >= 0")


def test_refuses_a_tensor_requiring_grad_under_compile():
    torch._dynamo.reset()
    args = pgd_step_arguments()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x_adv):
        op(x_adv, *list(args.values())[1:])
        return x_adv + 0

    with pytest.raises(Exception, match="pgd_step_: x_adv requires grad"):
        step(args["x_adv"].clone().requires_grad_())
    with torch.no_grad():
        x = args["x_adv"].clone().requires_grad_()
        step(x)
    expected = pgd_step_arguments()
    op(*expected.values())
    assert_verbose_equal(x.detach(), expected["x_adv"])


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", PGD_TENSOR_ARGUMENTS)
def test_functional_refuses_arguments_that_are_not_strided_by_name(backend, name):
    """A sparse (or mkldnn) argument of robust_ops.pgd_step_ got the dispatcher's many-line "Could not run
    'robust_ops::pgd_step_' with arguments from the 'SparseCPU' backend" (native) or torch's errors (reference; a
    sparse x_adv "expected x_adv without internal overlap", a sparse grad ran); refused in one line naming the
    argument, as drop_max_pool2d refuses its input, before anything is written."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4, 4))
    values = dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps, history=torch.zeros((2, 2, 3, 4, 4)))
    before = {key: values[key].clone() for key in ("x_adv", "history")}
    layouts = [("sparse_coo", values[name].to_sparse())]
    if values[name].dim() == 4:
        layouts.append(("_mkldnn", values[name].to_mkldnn()))
    for layout_name, t in layouts:
        args = dict(values, **{name: t})
        with pytest.raises(RuntimeError, match=re.escape(
            f"pgd_step_: expected {name} to be a strided (dense) tensor, got torch.{layout_name}; there is no "
            "pgd_step_ kernel for it: convert with .to_dense()"
        )):
            robust_ops.pgd_step_(args["x_adv"], args["x_nat"], args["grad"], args["alpha"], args["eps"],
                                 history=args["history"], slot=1, backend=backend)
        for key, t_before in before.items():
            assert_verbose_equal(values[key], t_before, key)
