"""robust_ops::max_pool2d (CPU) against ATen's F.max_pool2d: outputs, indices and gradients bitwise equal on random
geometries, ties, NaN and -inf, both memory formats, the CPU instruction-set paths this CPU has; opcheck, gradcheck,
errors."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import robust_ops
from robust_ops import reference
from robust_ops.reference import pool_output_size

from test_drop_max_pool2d import check_double_backward_without_input, expected_format
from utils import assert_verbose_equal, run_with_cpu_isa

op = torch.ops.robust_ops.max_pool2d
backward_op = torch.ops.robust_ops._drop_max_pool2d_backward


def every_window_has_input(shape, args):
    """ATen returns an index outside the input for a window holding no input element (and its backward then writes
    outside grad_input); robust_ops returns -1 there. Bitwise comparisons skip such geometries."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode = args
    for size, k, s, p, d in ((shape[2], kh, sh, ph, dh), (shape[3], kw, sw, pw, dw)):
        for o in range(pool_output_size(size, k, s, p, d, ceil_mode)):
            if not any(0 <= o * s - p + t * d < size for t in range(k)):
                return False
    return True


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ceil_mode = draw(st.booleans())
    h = draw(st.integers((kh - 1) * dh + 1, 14))
    w = draw(st.integers((kw - 1) * dw + 1, 40))
    n, c = draw(st.integers(1, 3), label="n"), draw(st.integers(1, 19), label="c")
    values = draw(st.sampled_from(["integers", "normal", "nan", "-inf"]))
    fmt = draw(st.sampled_from(["contiguous", "channels_last"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, c, h, w), ((kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode), values, fmt, dtype, seed


def make_input(shape, values, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    if values == "integers":  # few distinct values: ties exercise the first-occurrence rule
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    if values == "nan":  # several NaN per window: ATen keeps the last one
        x[torch.rand(shape, generator=g) < 0.2] = float("nan")
    elif values == "-inf":
        x[torch.rand(shape, generator=g) < 0.4] = float("-inf")
    return x


def check_bitwise(x, args):
    out, idx = op(x, *args)
    ref_out, ref_idx = reference.max_pool2d(x, *args)
    assert_verbose_equal(out, ref_out, "output")
    assert_verbose_equal(idx, ref_idx, "indices")
    assert out.is_contiguous(memory_format=expected_format(ref_out))
    grad = torch.randn(ref_out.shape, dtype=x.dtype).contiguous(memory_format=expected_format(ref_out))
    (kh, kw), stride, padding, dilation, ceil_mode = args
    ref_grad = torch.ops.aten.max_pool2d_with_indices_backward(
        grad, x, (kh, kw), stride, padding, dilation, ceil_mode, ref_idx)
    # Overlapping windows add several gradients into one input element: the order must be ATen's too.
    assert torch.equal(backward_op(grad, idx, list(x.shape)), ref_grad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_bitwise_equal_to_aten_randomized(case):
    shape, args, values, fmt, dtype, seed = case
    if not every_window_has_input(shape, args):
        return
    x = make_input(shape, values, seed, dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_bitwise(x, args)


@pytest.mark.parametrize("shape", [(32, 64, 64, 64), (5, 7, 28, 29), (2, 3, 1, 50)])
def test_resnet_geometry_and_wide_rows(shape):
    x = torch.randn(shape)
    x[0, 0, 0, :8] = 1.0  # a tie
    args = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    check_bitwise(x, args)
    check_bitwise(x.contiguous(memory_format=torch.channels_last), args)


def test_nan_rule_is_atens_last_nan():
    x = torch.tensor([[[[1.0, float("nan"), 3.0, float("nan")]]]])
    out, idx = op(x, [1, 4], [1, 4], [0, 0], [1, 1], False)
    assert torch.isnan(out).all() and idx.item() == 3 == F.max_pool2d(x, (1, 4), return_indices=True)[1].item()


def test_window_without_input_returns_minus_one():
    # Dilation 2 with padding 1 over a single row: the window's taps fall on rows -1 and 1, outside the input.
    x = torch.randn(1, 1, 1, 4)
    out, idx = op(x, [2, 1], [1, 1], [1, 0], [2, 1], False)
    assert out.shape == (1, 1, 1, 4) and bool((idx == -1).all()) and bool((out == float("-inf")).all())
    assert torch.equal(backward_op(torch.ones_like(out), idx, [1, 1, 1, 4]), torch.zeros_like(x))


def test_double_backward_through_windows_without_input():
    check_double_backward_without_input(op, backward_op)


def test_functional_matches_f_max_pool2d_defaults_and_unbatched():
    x = torch.randn(3, 10, 11)
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=(2, 3),
                                                                                      ceil_mode=True)):
        assert torch.equal(robust_ops.max_pool2d(x, **kwargs), F.max_pool2d(x, **kwargs))
        out, idx = robust_ops.max_pool2d(x, return_indices=True, **kwargs)
        ref, ref_idx = F.max_pool2d(x, return_indices=True, **kwargs)
        assert torch.equal(out, ref) and torch.equal(idx, ref_idx)


def test_functional_falls_back_to_torch_for_other_dtypes_and_devices():
    x = torch.randn(1, 2, 6, 6, dtype=torch.bfloat16)
    assert torch.equal(robust_ops.max_pool2d(x, 2), F.max_pool2d(x, 2))
    meta = torch.empty(2, 3, 8, 8, device="meta")
    assert robust_ops.max_pool2d(meta, 2).shape == (2, 3, 4, 4)


def test_functional_falls_back_to_torch_for_other_layouts():
    # An mkldnn tensor (torch.utils.mkldnn inference) is CPU float32 but not strided: ATen pools it, and the op's
    # dispatcher refused it in many lines ("Could not run 'robust_ops::max_pool2d' with arguments from the
    # 'MkldnnCPU' backend"); a sparse one failed with "unsupported memory format option Contiguous".
    x = torch.randn(1, 2, 6, 6)
    out = robust_ops.max_pool2d(x.to_mkldnn(), 3, 2, 1)
    assert out.layout == torch._mkldnn
    assert torch.equal(out.to_dense(), F.max_pool2d(x, 3, 2, 1))
    with pytest.raises(NotImplementedError, match="max_pool2d_with_indices"):  # ATen's own refusal
        robust_ops.max_pool2d(x.to_sparse(), 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func imports it
def test_functorch_transforms_fall_back_to_torch():
    """The native op's register_autograd has no forward-mode formula (jvp used to give a zero tangent silently)
    and is refused by torch.func.grad; F.max_pool2d supports both, with the same values."""
    from torch.func import grad, jvp

    x = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    v = torch.randn_like(x)
    out, tangent = jvp(lambda t: robust_ops.max_pool2d(t, 2), (x,), (v,))
    assert torch.equal(tangent, jvp(lambda t: F.max_pool2d(t, 2), (x,), (v,))[1])
    assert tangent.abs().sum() > 0
    g = grad(lambda t: robust_ops.max_pool2d(t, 3, 2, 1).pow(2).sum())(x)
    assert torch.equal(g, grad(lambda t: F.max_pool2d(t, 3, 2, 1).pow(2).sum())(x))


def test_vmap_runs_the_op_once_on_the_folded_batch():
    """vmap of robust_ops.max_pool2d ran the op once per sample (torch's fallback, warning on stderr): its batching
    rule folds the vmapped dimension into N, bitwise F.max_pool2d's values and indices."""
    from torch.func import vmap

    functorch = torch._C._functorch
    was = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)  # an op without a rule raises
    try:
        x = torch.randn(3, 2, 4, 7, 6)
        out, idx = vmap(lambda t: robust_ops.max_pool2d(t, 3, 2, 1, return_indices=True), in_dims=1)(x)
    finally:
        functorch._set_vmap_fallback_enabled(was)
    expected = [F.max_pool2d(x[:, i], 3, 2, 1, return_indices=True) for i in range(x.shape[1])]
    assert torch.equal(out, torch.stack([o for o, _ in expected]))
    assert torch.equal(idx, torch.stack([i for _, i in expected]))


def test_torch_fx_symbolic_trace():
    # robust_ops.max_pool2d branches on device, dtype and dim: an fx leaf, as F.max_pool2d is.
    class Pool(torch.nn.Module):
        def forward(self, x):
            return robust_ops.max_pool2d(x, 3, 2, 1) + robust_ops.functional.max_pool2d(x, 3, 2, 1)

    traced = torch.fx.symbolic_trace(Pool())
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(robust_ops.functional.max_pool2d) == 2
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(traced(x), 2 * F.max_pool2d(x, 3, 2, 1))


def test_gradients_equal_through_autograd():
    x = torch.randn(4, 6, 15, 15, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 6, 8, 8)
    out = robust_ops.max_pool2d(x, 3, 2, 1)
    ref = F.max_pool2d(x_ref, 3, 2, 1)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x_ref, grad)
    assert torch.equal(out, ref) and torch.equal(g, g_ref)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)

    def f(t):
        return op(t, [3, 3], [2, 2], [1, 1], [1, 1], False)[0]

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_opcheck(fmt):
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    if fmt == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(op, (x, [3, 3], [2, 2], [1, 1], [1, 1], False))


@pytest.mark.parametrize(
    "args, message",
    [
        (((3, 3), (2, 2), (2, 2), (1, 1), False), "max_pool2d: expected padding to be at most half of kernel_size"),
        (((0, 3), (2, 2), (0, 0), (1, 1), False), r"max_pool2d: expected kernel_size to be two positive integers"),
        (((9, 9), (1, 1), (0, 0), (1, 1), False), "max_pool2d: expected kernel_size \\(9, 9\\) with dilation"),
    ],
)
def test_error_messages_name_the_op(args, message):
    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        op(x, *args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(RuntimeError, match=message):
            op(mode.from_tensor(x), *args)


def test_zero_channels_refused_like_aten_empty_batch_accepted():
    """F.max_pool2d refuses C = 0 ("Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size"); the op
    used to return a (2, 0, 2, 2) output. The fake kernel raises the same message."""
    x = torch.randn(2, 0, 4, 4)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="optional 0 dim batch size"):
        F.max_pool2d(x, 2)
    message = r"max_pool2d: expected input with non-zero channels, as F.max_pool2d, got \(2, 0, 4, 4\)"
    with pytest.raises(RuntimeError, match=message):
        op(x, *args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(RuntimeError, match=message):
            op(mode.from_tensor(x), *args)
    with pytest.raises(RuntimeError, match="max_pool2d: expected input with non-zero channels"):
        robust_ops.max_pool2d(torch.randn(0, 4, 4), 2)  # unbatched (C, H, W), as F.max_pool2d refuses it
    empty_batch = torch.randn(0, 3, 4, 4)
    out, idx = op(empty_batch, *args)
    ref, ref_idx = F.max_pool2d(empty_batch, 2, return_indices=True)
    assert out.shape == ref.shape == (0, 3, 2, 2) and idx.shape == ref_idx.shape


def test_output_layout_as_aten_for_a_channel_slice_of_a_channels_last_input():
    # ATen picks the layout with suggest_memory_format: channels_last for these non-dense inputs; the op's own rule
    # (channels_last-contiguous inputs only) gave NCHW outputs and gradients here.
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)[:, ::2].requires_grad_()
    out, ref = robust_ops.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1)
    assert_verbose_equal(out, ref)
    assert out.stride() == ref.stride()
    grad = torch.randn(ref.shape).contiguous(memory_format=torch.channels_last)
    (ours,), (theirs,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)
    assert_verbose_equal(ours, theirs)
    assert ours.stride() == theirs.stride()


@pytest.mark.parametrize("shape, kernel", [((2, 6, 8, 7), 2), ((2, 6, 2, 2), 2), ((2, 6, 7, 7), 7)])
@pytest.mark.parametrize("grad_fmt", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_input_gradient_takes_the_inputs_layout_as_atens_whatever_grad_outputs(fmt, grad_fmt, shape, kernel):
    # ATen's backward puts grad_input in the input's layout; the op's took grad_output's (a channels_last model's
    # pool before flatten gets an NCHW gradient and gave an NCHW one back) and was NCHW for an N x C x 1 x 1 output of
    # a channels_last input whatever grad_output's: same values, other strides.
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x = torch.randn(shape).contiguous(memory_format=formats[fmt]).requires_grad_()
    out, ref = robust_ops.max_pool2d(x, kernel), F.max_pool2d(x, kernel)
    assert out.stride() == ref.stride()
    grad = torch.randn(ref.shape)
    grad = torch.ones(()).expand(ref.shape) if grad_fmt == "expanded" else grad.contiguous(
        memory_format=formats[grad_fmt])
    (ours,), (theirs,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)
    assert_verbose_equal(ours, theirs)
    assert ours.stride() == theirs.stride()


@pytest.mark.parametrize("size, args", [((9, 7), (3, 2, 1)), ((1, 1), (2, 1, 1))])
def test_unbatched_output_is_contiguous_as_atens_for_an_hwc_image(size, args):
    # ATen pools a (C, H, W) input into a contiguous output whatever its strides; an HWC image viewed as CHW
    # (permute(2, 0, 1), as from numpy or PIL) is channels_last once unsqueezed, and came out HWC-strided here. A
    # 1 x 1 one is contiguous already, with strides (1, 3, 3) that contiguous() kept: its padded 3 x 2 x 2 output
    # came out with strides (1, 6, 3) until 2026-12-07.
    x = torch.randn(*size, 3).permute(2, 0, 1).requires_grad_()
    out, ref = robust_ops.max_pool2d(x, *args), F.max_pool2d(x, *args)
    assert_verbose_equal(out, ref)
    assert out.stride() == ref.stride()
    grad = torch.randn(ref.shape)
    (ours,), (theirs,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)
    assert_verbose_equal(ours, theirs)
    assert ours.stride() == theirs.stride()


def test_functional_argument_errors():
    with pytest.raises(TypeError, match="max_pool2d: expected kernel_size to be an int or a pair of ints"):
        robust_ops.max_pool2d(torch.randn(1, 1, 4, 4), "2")
    with pytest.raises(RuntimeError, match="max_pool2d: expected input to be a floating-point tensor"):
        op(torch.ones(1, 1, 4, 4, dtype=torch.int64), [2, 2], [2, 2], [0, 0], [1, 1], False)
    # as F.max_pool2d (the path for other dtypes and devices): bool("False") used to mean ceil_mode=True here
    with pytest.raises(TypeError, match=r"^max_pool2d: expected ceil_mode to be a bool, got 'False'$"):
        robust_ops.max_pool2d(torch.randn(1, 1, 5, 5), 2, ceil_mode="False")


_ISA_SCRIPT = """
import torch, robust_ops
from robust_ops import reference
g = torch.Generator().manual_seed(0)
x = torch.randint(-3, 4, (2, 17, 9, 41), generator=g).float()
x[0, 2, 5, 9] = float("nan")
x[1, 3, 2, 2:6] = float("-inf")
for xx in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, ::2]):
    for args in (((3, 3), (2, 2), (1, 1), (1, 1), False), ((2, 3), (1, 3), (1, 1), (2, 1), True)):
        out, idx = torch.ops.robust_ops.max_pool2d(xx, *args)
        ref, ref_idx = reference.max_pool2d(xx, *args)
        assert torch.equal(idx, ref_idx) and torch.equal(out.nan_to_num(), ref.nan_to_num()), args
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_cpu_instruction_set_path(isa):
    # The default runs above use the best path the machine has.
    run_with_cpu_isa(_ISA_SCRIPT, isa)


_BAD_ISA_SCRIPT = """
import torch, robust_ops
x = torch.randn(1, 1, 8, 40)
for name in ("max_pool2d", "drop_max_pool2d", "_cpu_vector_isa"):  # a failed read is raised again, by each reader
    try:
        op = getattr(torch.ops.robust_ops, name)
        op() if name == "_cpu_vector_isa" else op(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    except RuntimeError as e:
        print(str(e).splitlines()[0])
"""


def test_bad_cpu_instruction_set_cap_names_the_calling_op():
    """max_pool2d shares the drop-max kernel, whose $ROBUST_OPS_CPU_ISA check said 'drop_max_pool2d:' for both ops."""
    import os
    import platform

    from utils import run_python

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if platform.machine() != "x86_64" or " avx2" not in flags:
        pytest.skip("the cap is read only where the AVX2 / AVX-512 paths can run")
    printed = run_python(_BAD_ISA_SCRIPT, dict(os.environ, ROBUST_OPS_CPU_ISA="AVX2")).splitlines()
    expected = "expected $ROBUST_OPS_CPU_ISA to be avx512, avx2 or scalar, got 'AVX2'"
    assert printed == [f"max_pool2d: {expected}", f"drop_max_pool2d: {expected}", f"_cpu_vector_isa: {expected}"]


def test_fallback_for_integer_inputs_keeps_every_argument():
    # Integer inputs (the kernels take floating point only) and bfloat16 run F.max_pool2d, ceil_mode and indices too.
    for x in (torch.randint(-5, 5, (1, 2, 7, 7)), torch.randn(1, 2, 7, 7, dtype=torch.bfloat16)):
        out, idx = robust_ops.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        ref, ref_idx = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        assert out.shape == (1, 2, 4, 4) and torch.equal(out, ref) and torch.equal(idx, ref_idx)


def test_output_and_gradient_strides_as_atens_for_size_one_dimensions_of_any_stride():
    # ATen's layout rule (suggest_memory_format) also reads the strides of size-1 dimensions: a channels_last-
    # contiguous batch of one HWC image, (1, 3, 4, 2) of strides (3, 1, 6, 3), pools into NCHW there (N's stride is
    # under C * H * W), and came out channels_last here, its input gradient too. A seeded sweep of such strides.
    rng = random.Random(0)
    hwc = torch.randn(4, 2, 3).permute(2, 0, 1).unsqueeze(0)
    cases = [(hwc, 2, 0)]
    for _ in range(300):
        shape = [rng.choice([1, 1, 2]), rng.choice([1, 2, 3]), rng.randint(1, 4), rng.randint(1, 4)]
        fmt = rng.choice([torch.contiguous_format, torch.channels_last])
        strides = list(torch.empty(shape).contiguous(memory_format=fmt).stride())
        strides = [rng.randint(1, 40) if size == 1 and rng.random() < 0.7 else s for size, s in zip(shape, strides)]
        kernel = rng.randint(1, min(shape[2:]))
        x = torch.empty_strided(shape, strides, dtype=rng.choice([torch.float32, torch.float64]))
        cases.append((x.copy_(torch.randn(shape)), kernel, rng.randint(0, kernel // 2)))
    for x, kernel, padding in cases:
        x = x.detach().requires_grad_()
        out, idx = robust_ops.max_pool2d(x, kernel, 1, padding, return_indices=True)
        ref, ref_idx = F.max_pool2d(x, kernel, 1, padding, return_indices=True)
        where = f"shape {tuple(x.shape)}, strides {x.stride()}, kernel {kernel}, padding {padding}"
        assert (out.stride(), idx.stride()) == (ref.stride(), ref_idx.stride()), where
        assert torch.equal(out, ref) and torch.equal(idx, ref_idx), where
        grad = torch.randn(ref.shape, dtype=x.dtype)
        (ours,), (theirs,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(ref, x, grad)
        assert torch.equal(ours, theirs) and ours.stride() == theirs.stride(), where


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated
def test_jit_trace_of_an_input_contiguous_in_neither_layout():
    """torch.jit.trace of max_pool2d failed for an input contiguous in neither layout (a channel slice of a
    channels_last tensor, a strided slice): torch's suggest_memory_format compares sizes, tensors under the tracer
    ("AssertionError: Expected bool, got <class 'torch.Tensor'>"). The trace runs, ATen's values and indices."""
    base = torch.randn(2, 6, 5, 5)
    for x in (base.contiguous(memory_format=torch.channels_last)[:, :3], base[:, :, ::2]):
        traced = torch.jit.trace(lambda t: robust_ops.max_pool2d(t, 2, return_indices=True), x)
        for y in (x, x * 2):
            (out, idx), (ref, ref_idx) = traced(y), F.max_pool2d(y, 2, return_indices=True)
            assert torch.equal(out, ref) and torch.equal(idx, ref_idx), x.stride()
