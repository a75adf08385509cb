"""Triton drop_max_pool2d kernels against robust_ops.reference: on CUDA, or on CPU under TRITON_INTERPRET=1
(set before import). Small shapes: the interpreter is slow."""

import functools
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import robust_ops
from robust_ops import reference

from test_drop_max_pool2d import (check_against_reference, check_double_backward_without_input,
                                  check_half_gradients_round_once, expected_format, layout, make_input, pool_cases,
                                  random_layouts)
from utils import assert_verbose_equal

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def triton_op():
    return torch.ops.robust_ops.drop_max_pool2d_triton


def check(x, args):
    return check_against_reference(x, args, triton_op())


@functools.cache
def triton_op_takes_schema():
    """Whether torch.library.triton_op uses its `schema` argument (torch 2.11 ignored it and inferred one from the
    annotations, which fails on an unannotated function)."""
    try:
        torch.library.triton_op("robust_ops_test::schema_probe", mutates_args=(), schema="(Tensor x) -> Tensor")(
            lambda x: x.clone()
        )
    except ValueError:
        return False
    return True


def test_schema_matches_native():
    native = str(torch.ops.robust_ops.drop_max_pool2d.default._schema)
    tri = str(triton_op().default._schema)
    native_bwd = str(torch.ops.robust_ops._drop_max_pool2d_backward.default._schema)
    tri_bwd = str(torch.ops.robust_ops._drop_max_pool2d_backward_triton.default._schema)
    if not triton_op_takes_schema():  # inferred from the annotations: int[2] reads SymInt[]
        native = native.replace("int[2]", "SymInt[]")
    assert tri.replace("drop_max_pool2d_triton", "drop_max_pool2d") == native
    assert tri_bwd.replace("_backward_triton", "_backward") == native_bwd


# On CUDA the check is an asynchronous device assert: it would fail this process's CUDA context, every later test's too.
@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the check is an asynchronous device assert")
def test_backward_refuses_indices_outside_the_input():
    """As the C++ kernels: an index past H*W is an error, never skipped."""
    backward = torch.ops.robust_ops._drop_max_pool2d_backward_triton
    grad = torch.ones(1, 1, 1, 2, device=DEVICE)
    for bad in (999, 4, -2):  # 4 = H*W: one past the last element
        with pytest.raises(RuntimeError, match=r"_drop_max_pool2d_backward: expected indices in \[0, 4\) .* or -1 "):
            backward(grad, torch.tensor([[[[0, bad]]]], device=DEVICE), [1, 1, 2, 2])


def test_grid_limit_is_cudas_on_programs():
    """CUDA's 1-D grid takes at most 2**31 - 1 programs of BLOCK (256) elements: 2**39 output elements, which an
    expanded input or grad_output of a few bytes reaches. Refused by name before anything is allocated, where the
    allocator failed first naming no op ("can't allocate memory: you tried to allocate 2199023255552 bytes"; past it
    Triton's launcher raises "OverflowError: signed integer is greater than maximum")."""
    from robust_ops.triton._utils import MAX_PROGRAMS, flat_grid

    assert MAX_PROGRAMS == 2**31 - 1
    assert flat_grid("drop_max_pool2d_triton", "the output", 256 * (2**31 - 1), 256) == (2**31 - 1,)
    huge = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(2**10, 2**10, 2**10, 2**9)  # 2**39 elements, 4 bytes
    with pytest.raises(RuntimeError, match=re.escape(
        "drop_max_pool2d_triton: expected at most 2147483647 programs (CUDA's limit on a 1-D grid) of 256 elements "
        "each, got 2147483648 for the output of 549755813888 elements; split the batch"
    )):
        triton_op()(huge, [1, 1], [1, 1], [0, 0], [1, 1], False)
    indices = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=DEVICE).expand(huge.shape)
    with pytest.raises(RuntimeError, match=re.escape(
        "_drop_max_pool2d_backward_triton: expected at most 2147483647 programs (CUDA's limit on a 1-D grid) of 256 "
        "elements each, got 2147483648 for grad_output of 549755813888 elements; split the batch"
    )):
        torch.ops.robust_ops._drop_max_pool2d_backward_triton(huge, indices, [2**10, 2**10, 1, 1])


def test_grid_limit_lowered_refuses_past_it_and_runs_at_it(monkeypatch):
    """The launches take their grid from the checked helper (the limit lowered: 2 x 3 x 10 x 10 = 600 outputs take
    3 programs)."""
    import robust_ops.triton._utils as triton_utils

    x = make_input((2, 3, 10, 10), "integers", seed=3)
    args = ((1, 1), (1, 1), (0, 0), (1, 1), False)
    out, idx = triton_op()(x.to(DEVICE), *args)
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 2)
    with pytest.raises(RuntimeError, match=re.escape(
        "drop_max_pool2d_triton: expected at most 2 programs (CUDA's limit on a 1-D grid) of 256 elements each, got 3 "
        "for the output of 600 elements; split the batch"
    )):
        triton_op()(x.to(DEVICE), *args)
    with pytest.raises(RuntimeError, match=re.escape(
        "_drop_max_pool2d_backward_triton: expected at most 2 programs (CUDA's limit on a 1-D grid) of 256 elements "
        "each, got 3 for grad_output of 600 elements; split the batch"
    )):
        torch.ops.robust_ops._drop_max_pool2d_backward_triton(torch.ones_like(out), idx, list(x.shape))
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 3)
    check(x.to(DEVICE), args)
    grad = torch.ops.robust_ops._drop_max_pool2d_backward_triton(torch.ones_like(out), idx, list(x.shape))
    assert_verbose_equal(grad, torch.ones_like(x).to(DEVICE), "grad_input")


@pytest.mark.parametrize("shape", [(2, 1, 3, 2), (2, 3, 1, 1)])
def test_inputs_both_nchw_and_channels_last_pool_into_atens_strides(shape):
    """One channel or 1 x 1 images, contiguous in both formats, with NCHW or channels_last strides: the outputs,
    indices and input gradient take F.max_pool2d's strides, as the native op's (a 2 x 3 x 1 x 1 input of strides
    (3, 1, 3, 3) gave an NCHW 2 x 2 output where ATen's is channels_last)."""
    n, c, h, w = shape
    args = ([2, 2], [1, 1], [1, 1], [1, 1], False)
    for x in (torch.randn(shape), torch.randn(n, h, w, c).permute(0, 3, 1, 2)):
        x = x.to(DEVICE)
        xa = x.clone().requires_grad_()
        aten_out, aten_idx = torch.nn.functional.max_pool2d(xa, *args[:4], return_indices=True)
        aten_out.backward(torch.ones_like(aten_out))
        out, idx = triton_op()(x, *args)
        assert (out.stride(), idx.stride()) == (aten_out.stride(), aten_idx.stride()), x.stride()
        grad = torch.ops.robust_ops._drop_max_pool2d_backward_triton(torch.ones_like(out), idx, list(shape))
        assert grad.stride() == xa.grad.stride(), x.stride()
        check(x, args)


def test_a_one_channel_input_pooled_to_one_pixel_gets_its_gradient_in_its_own_layout():
    """As the native op's: N x 1 x 1 x 1 indices have the same strides in both layouts, and a channels_last
    one-channel input pooled to 1 x 1 got an NCHW gradient, (20, 20, 4, 1) where F.max_pool2d's is (20, 1, 4, 1)."""
    x = torch.randn(2, 5, 4, 1).permute(0, 3, 1, 2).to(DEVICE).requires_grad_()
    grad = torch.randn(2, 1, 1, 1, device=DEVICE)
    atens = torch.autograd.grad(torch.nn.functional.max_pool2d(x, 4), x, grad)[0]
    ours = torch.autograd.grad(triton_op()(x, [4, 4], [4, 4], [0, 0], [1, 1], False)[0], x, grad)[0]
    assert ours.stride() == atens.stride() == (20, 1, 4, 1)


def test_functional_output_and_gradient_strides_as_atens_for_inputs_of_any_layout():
    """As the native backend's: backend="triton" gives F.max_pool2d's output, indices and input gradient strides for
    every input layout, with the op's values (a batch of one HWC image pooled into (6, 1, 3, 3)-strided outputs,
    ATen's (6, 2, 1, 1); a channel slice of a channels_last tensor into NCHW, ATen's channels_last)."""
    for x, kernel, padding in random_layouts(1, 40):
        where = f"shape {tuple(x.shape)}, strides {x.stride()}, kernel {kernel}, padding {padding}"
        x = x.to(DEVICE).requires_grad_()
        ref, ref_idx = torch.nn.functional.max_pool2d(x, kernel, 1, padding, return_indices=True)
        grad = torch.randn(ref.shape, dtype=x.dtype, device=DEVICE)
        out, idx = robust_ops.drop_max_pool2d(x, kernel, 1, padding, return_indices=True, backend="triton")
        assert (out.stride(), idx.stride()) == (ref.stride(), ref_idx.stride()), where
        values, indices = triton_op()(x, [kernel] * 2, [1, 1], [padding] * 2, [1, 1], False)
        assert torch.equal(out, values) and torch.equal(idx, indices), where
        ours, atens = (torch.autograd.grad(t, x, grad)[0] for t in (out, ref))
        assert ours.stride() == atens.stride(), where
        assert torch.equal(ours, torch.autograd.grad(values, x, grad)[0]), where


def test_arguments_that_are_not_strided_are_refused_by_name():
    """Sparse and mkldnn tensors met torch's "Cannot access storage of SparseTensorImpl" (OpaqueTensorImpl), or for
    sparse indices "Could not run 'aten::ge.Scalar' with arguments from the 'SparseCPU' backend", naming neither op
    nor argument; refused in one line, as robust_ops.drop_max_pool2d refuses its input."""
    x = make_input((2, 3, 4, 4), "normal", seed=5).to(DEVICE)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    out, idx = triton_op()(x, *args)

    def refusal(op, name, layout_name):
        return pytest.raises(RuntimeError, match=re.escape(
            f"{op}: expected {name} to be a strided (dense) tensor, got torch.{layout_name}; there is no Triton kernel "
            "for it: convert with .to_dense()"
        ))

    backward = torch.ops.robust_ops._drop_max_pool2d_backward_triton
    for layout_name, convert in (("sparse_coo", lambda t: t.to_sparse()), ("_mkldnn", lambda t: t.cpu().to_mkldnn())):
        with refusal("drop_max_pool2d_triton", "input", layout_name):
            triton_op()(convert(x), *args)
        with refusal("_drop_max_pool2d_backward_triton", "grad_output", layout_name):
            backward(convert(torch.ones_like(out)), idx, list(x.shape))
    with refusal("_drop_max_pool2d_backward_triton", "indices", "sparse_coo"):
        backward(torch.ones_like(out), idx.to_sparse(), list(x.shape))


def test_backward_index_minus_one_adds_nowhere():
    """-1, a window without input elements, is allowed and adds no gradient."""
    backward = torch.ops.robust_ops._drop_max_pool2d_backward_triton
    ok = backward(torch.ones(1, 1, 1, 2, device=DEVICE), torch.tensor([[[[0, -1]]]], device=DEVICE), [1, 1, 2, 2])
    assert ok.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    # -1 adds nowhere, not at flat position -1 (channel 1's would be channel 0's last element).
    two = backward(torch.ones(1, 2, 1, 1, device=DEVICE), torch.tensor([[[[0]], [[-1]]]], device=DEVICE), [1, 2, 2, 2])
    assert two.flatten().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool_cases())
def test_matches_reference_randomized(case):
    shape, args, values, fmt, seed = case
    check(layout(make_input(shape, values, seed), fmt).to(DEVICE), args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype):
    args = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    for fmt in ("contiguous", "channels_last"):
        out, _ = check(layout(make_input((1, 5, 9, 7), "integers", 2, dtype), fmt).to(DEVICE), args)
        assert out.dtype == dtype


def test_nan_and_ties():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[[1.0, nan, -inf, -inf], [2.0, 0.0, -inf, -inf], [inf, inf, 4.0, -inf], [5.0, 6.0, nan, 1.0]]]])
    for args in (((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (1, 1), (1, 1), (1, 1), False)):
        check(x.to(DEVICE), args)
    x = torch.tensor([[[[5.0, 5.0, 1.0]]]], device=DEVICE)
    out, idx = triton_op()(x, (1, 3), (1, 3), (0, 0), (1, 1), False)
    assert out.item() == 5.0 and idx.item() == 1
    # Several NaN in one window: the first one (row-major).
    x = torch.tensor([[[[1.0, nan], [nan, 2.0]]]], device=DEVICE)
    out, idx = check(x, ((2, 2), (1, 1), (0, 0), (1, 1), False))
    assert bool(torch.isnan(out).all()) and idx.item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_without_input_elements(dtype):
    """Windows that miss the input (dilation 2 over one row, with padding) output -inf with index -1, as in the
    reference: the double-backward test clamps those outputs, so a kernel writing 0 there passed (found by the
    mutation pass)."""
    args = ((2, 2), (1, 1), (1, 1), (2, 2), False)
    x = make_input((2, 2, 1, 3), "normal", 7, dtype).to(DEVICE)
    out, idx = check(x, args)
    assert bool((idx == -1).all()) and bool((out == float("-inf")).all())


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_matches_reference_autograd(fmt, dtype):
    args = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    x = layout(make_input((2, 3, 9, 7), "normal", 5, dtype), fmt).to(DEVICE)
    grad = make_input((2, 3, 5, 4), "normal", 6, dtype).to(DEVICE)
    x1 = x.clone().requires_grad_()
    triton_op()(x1, *args)[0].backward(grad)
    x2 = x.clone().requires_grad_()
    reference.drop_max_pool2d(x2, *args)[0].backward(grad)
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    assert x1.grad.is_contiguous(memory_format=expected_format(x))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_op_returns_the_native_dtype_and_layout(fmt, dtype):
    """Called directly (autograd would cast and restride what it returns): grad_input in grad_output's dtype and the
    indices' memory format (the input's), as the native backward returns it, grad_output in the other layout."""
    args = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    x = make_input((1, 3, 7, 6), "normal", 3, dtype).to(DEVICE)
    _, idx = triton_op()(x, *args)
    other = "contiguous" if fmt == "channels_last" else "channels_last"
    grad = layout(make_input(tuple(idx.shape), "normal", 4, dtype), other).to(DEVICE)
    idx = layout(idx, fmt)
    got = torch.ops.robust_ops._drop_max_pool2d_backward_triton(grad, idx, list(x.shape))
    want = torch.ops.robust_ops._drop_max_pool2d_backward(grad.cpu(), idx.cpu(), list(x.shape))
    assert got.dtype == want.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_backward_op_tells_one_by_one_indices_apart_by_their_strides_as_the_native_one(fmt):
    """The indices of an N x C x 1 x 1 output are NCHW and channels_last at once: grad_input takes the layout of
    their strides (the input's), as the native backward (mutation testing: the launcher's layout read by
    is_contiguous alone passed this file, an NCHW grad_input for a channels_last input pooled to one pixel)."""
    args = ((3, 3), (3, 3), (0, 0), (1, 1), False)
    x = layout(make_input((2, 4, 3, 3), "normal", 3, torch.float32), fmt).to(DEVICE)
    _, idx = triton_op()(x, *args)
    assert idx.shape == (2, 4, 1, 1) and idx.is_contiguous() and idx.is_contiguous(memory_format=torch.channels_last)
    grad = make_input(tuple(idx.shape), "normal", 4, torch.float32).to(DEVICE)
    got = torch.ops.robust_ops._drop_max_pool2d_backward_triton(grad, idx, list(x.shape))
    want = torch.ops.robust_ops._drop_max_pool2d_backward(grad.cpu(), idx.cpu(), list(x.shape))
    assert got.stride() == want.stride() == x.stride()
    assert_verbose_equal(got.cpu(), want, "grad_input")


def test_half_gradients_accumulate_in_float32_and_round_once():
    check_half_gradients_round_once(triton_op(), torch.ops.robust_ops._drop_max_pool2d_backward_triton, DEVICE)


def test_gradcheck_float64():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = [(3, 2), (2, 1), (1, 1), (1, 2), True]
    assert torch.autograd.gradcheck(lambda t: triton_op()(t, *args)[0], (x,), fast_mode=True)


def test_float64_compares_and_accumulates_in_float64():
    # Distinct values closer than float32 resolution (or beyond its range): compared in float32 they would tie (or
    # all become inf) and another element would be selected.
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randperm(20, generator=g).to(torch.float64).reshape(1, 1, 4, 5) * 1e-12
    for args in (((1, 2), (1, 2), (0, 0), (1, 1), True), ((3, 3), (1, 1), (1, 1), (1, 1), False)):
        check(x.to(DEVICE), args)
        check((x * 1e300).to(DEVICE), args)
    out, idx = triton_op()(torch.tensor([[[[1.0, 1.0 + 1e-12]]]], device=DEVICE, dtype=torch.float64),
                           (1, 2), (1, 2), (0, 0), (1, 1), False)
    assert out.item() == 1.0 and idx.item() == 0
    # Backward: overlapping windows sum gradients that differ below float32 resolution.
    args = ((3, 3), (1, 1), (1, 1), (1, 1), False)
    grad = 1.0 + torch.randperm(20, generator=g).to(torch.float64).reshape(1, 1, 4, 5) * 1e-12
    x1 = x.to(DEVICE).detach().requires_grad_()
    triton_op()(x1, *args)[0].backward(grad.to(DEVICE))
    x2 = x.clone().requires_grad_()
    reference.drop_max_pool2d(x2, *args)[0].backward(grad)
    # Atomics may add in another order (a rounding step); float32 sums would be off by ~1e-12.
    torch.testing.assert_close(x1.grad.cpu(), x2.grad, rtol=1e-15, atol=0)
    assert x1.grad.dtype == torch.float64


def test_double_backward_through_windows_without_input():
    check_double_backward_without_input(triton_op(), torch.ops.robust_ops._drop_max_pool2d_backward_triton, DEVICE)


def test_backend_triton_through_module():
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    a = robust_ops.DropMax2d(3, 2, 1, backend="triton")(x)
    b = robust_ops.DropMax2d(3, 2, 1, backend="reference")(x)
    assert_verbose_equal(a, b)


def test_error_message_matches_native():
    with pytest.raises(RuntimeError, match="drop_max_pool2d: expected input to be 4-D"):
        triton_op()(torch.zeros(1, 4, 4, device=DEVICE), (2, 2), (2, 2), (0, 0), (1, 1), False)
    with pytest.raises(RuntimeError, match="expected padding to be at most half of kernel_size"):
        triton_op()(torch.zeros(1, 1, 4, 4, device=DEVICE), (2, 2), (2, 2), (2, 0), (1, 1), False)


@pytest.mark.needs_cuda
def test_opcheck_and_compile_cuda():
    x = torch.randn(2, 3, 9, 8, device="cuda", requires_grad=True)
    torch.library.opcheck(triton_op(), (x, [3, 3], [2, 2], [1, 1], [1, 1], False))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), robust_ops.DropMax2d(3, 2, 1, backend="triton"))
    model = model.cuda()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_backward_device_mismatch_matches_native():
    """The C++ device check (a meta tensor stands in for another device; the native op dispatches it to the fake)."""
    grad = torch.ones(1, 1, 2, 2, device=DEVICE)
    indices = torch.zeros(1, 1, 2, 2, dtype=torch.int64, device="meta")
    match = rf"_drop_max_pool2d_backward: expected indices on the device of grad_output \({grad.device}\), got meta"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.robust_ops._drop_max_pool2d_backward_triton(grad, indices, [1, 1, 4, 4])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.robust_ops._drop_max_pool2d_backward(grad, indices, [1, 1, 4, 4])


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("warn_only", [False, True])
def test_backward_alerts_nondeterminism_on_cuda_only(backend, warn_only):
    """The CUDA and Triton backwards add with float atomics: on CUDA torch.use_deterministic_algorithms(True) refuses
    them (warn_only=True: a warning), as ATen's max_pool2d backward. The CPU kernel (and the interpreter, which runs
    programs in order) is deterministic and stays silent. Run through autograd, where a user meets it: a torch.ops call
    does not turn a C++ kernel's warning into a Python one (it goes to stderr), so a direct call of the native CUDA
    backward gave pytest.warns nothing to see (H200, 2026-12-04); backward() does."""
    if backend == "native" and DEVICE == "cuda" and not robust_ops._extension.has_cuda_kernels():
        pytest.skip("robust_ops built without CUDA kernels")
    pool = triton_op() if backend == "triton" else torch.ops.robust_ops.drop_max_pool2d
    x = torch.zeros(1, 2, 5, 5, device=DEVICE)
    x[:, :, 2, 2], x[:, :, 0, 0] = 2.0, 1.0  # (2, 2) is in every window holding (0, 0): the 9 of them select (0, 0)
    x.requires_grad_()
    args = ((5, 5), (1, 1), (2, 2), (1, 1), False)

    def backward():
        pool(x, *args)[0].backward(torch.ones(1, 2, 5, 5, device=DEVICE))

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        message = "_drop_max_pool2d_backward.* does not have a deterministic implementation"
        if DEVICE == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                backward()
            assert x.grad[0, :, 0, 0].tolist() == [9.0, 9.0]
        elif warn_only:
            with pytest.warns(UserWarning, match=message):
                backward()
        else:
            with pytest.raises(RuntimeError, match=message):
                backward()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func imports it
def test_torch_func_transforms_run_the_triton_ops():
    # As for the native op (test_drop_max_pool2d): torch.func.grad and forward-mode AD were refused; they run the
    # Triton forward and backward ops now, vmap included (their batching rules), with the reference's values.
    from torch.func import grad, jvp, vmap

    x = torch.rand(2, 1, 4, 4, device=DEVICE)
    v = torch.randn_like(x)
    per_sample = {b: vmap(grad(lambda t, b=b: robust_ops.drop_max_pool2d(t, 2, backend=b).pow(2).sum()))(x)
                  for b in ("triton", "reference")}
    assert_verbose_equal(per_sample["triton"], per_sample["reference"])
    tangents = {b: jvp(lambda t, b=b: robust_ops.drop_max_pool2d(t, 2, backend=b), (x,), (v,))[1]
                for b in ("triton", "reference")}
    assert_verbose_equal(tangents["triton"], tangents["reference"])
