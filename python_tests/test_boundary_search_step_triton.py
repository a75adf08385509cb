"""robust_ops::boundary_search_step_triton: equality with robust_ops.reference, the search properties, the schema
and the argument checks. Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (small shapes: the interpreter is slow).
opcheck and torch.compile need a GPU (triton_op cannot trace interpreted kernels)."""

import re

import pytest
import torch

import robust_ops
from robust_ops import reference

from test_boundary_search_step import (
    ARITIES,
    SHARING_CASES,
    _bad_inputs,
    _sharing,
    check_backward_sees_the_mutation,
    check_refuses_a_sparse_argument,
    check_refuses_argument_requiring_grad,
    check_runs_without_grad_mode_and_bumps_versions,
    classify,
    first_crossed,
    make_inputs,
    run_both,
)
from utils import TOLERANCES, assert_verbose_equal

pytestmark = pytest.mark.triton

NATIVE_OP = torch.ops.robust_ops.boundary_search_step_


def triton_op():  # registered at import robust_ops only where Triton can run (here: under TRITON_INTERPRET=1)
    return torch.ops.robust_ops.boundary_search_step_triton


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_schema_matches_native_apart_from_name():
    native = NATIVE_OP.default._schema
    triton = triton_op().default._schema
    assert triton.name == "robust_ops::boundary_search_step_triton"

    def signature(schema):
        return [
            (a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments
        ], [str(r.type) for r in schema.returns]

    assert signature(triton) == signature(native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("k", ARITIES)
@pytest.mark.parametrize("active", [False, True])
def test_matches_reference_bitwise(dtype, k, active):
    lo, hi, points, crossed_at, mask = make_inputs(k, shape=(2 * k + 1, 3, 5), dtype=dtype, device=device(),
                                                   active=active)
    got, want = run_both(triton_op(), lo, hi, points, crossed_at, mask)
    for name, g, w in zip(("lo", "hi", "points"), got, want):
        assert_verbose_equal(g, w, name)


@pytest.mark.parametrize("k", [2, 4])
def test_bfloat16(k):
    """Bitwise on GPU in principle; the interpreter truncates float32 -> bfloat16, so compare with tolerance."""
    lo, hi, points, crossed_at, mask = make_inputs(k, shape=(9, 2, 7), dtype=torch.bfloat16, device=device(),
                                                   active=True)
    got, want = run_both(triton_op(), lo, hi, points, crossed_at, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.bfloat16])


def test_special_values():
    k, n = 3, 9
    lo, hi, points = torch.randn(n, 5), torch.randn(n, 5), torch.randn(k - 1, n, 5)
    lo[0, 0], hi[1, 1], points[0, 2, 2], lo[3, 3] = -0.0, float("inf"), float("nan"), float("-inf")
    # A bracket of negative zeros for every crossed_at: the new lo and hi are -0.0, so are the points. The kernel
    # picks the new bounds with tl.where; taking the sum of the two masked loads (the other one 0.0) gave +0.0 there
    # and passed while only one end was -0.0 (found by the mutation pass).
    lo[:, 4], hi[:, 4], points[:, :, 4] = -0.0, -0.0, -0.0
    crossed_at = torch.arange(n) % k
    args = [t.to(device()) for t in (lo, hi, points, crossed_at)]
    got, want = run_both(triton_op(), *args, None)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)
        assert torch.equal(torch.signbit(g), torch.signbit(w))


def test_subnormals_are_kept():
    """float32 subnormal bounds give the reference's subnormal points, as torch computes them. The compiled kernel's
    products were libdevice's mul.rn.ftz.f32 (triton's default enable_reflect_ftz), which flushes them to zero; the
    interpreter computes in numpy, so only a GPU run (or test_triton_ptx.py, which reads the PTX) tells."""
    tiny = torch.finfo(torch.float32).tiny
    lo = torch.tensor([[tiny / 4, -tiny / 2, tiny / 8, 0.0]], device=device())
    hi = torch.tensor([[tiny / 2, -tiny / 8, 3 * tiny / 4, tiny / 4]], device=device())
    points = torch.stack([lo * w_lo + hi * w_hi for w_lo, w_hi in reference.interpolation_weights(3)])
    for c in range(3):
        got, want = run_both(triton_op(), lo, hi, points, torch.tensor([c], device=device()), None)
        for name, g, w in zip(("lo", "hi", "points"), got, want):
            assert_verbose_equal(g, w, name)
        assert bool((want[2] != 0).any())


@pytest.mark.parametrize("k", [2, 4])
def test_non_contiguous(k):
    n, dev = 5, device()
    lo = torch.randn(3, n, device=dev).t()
    hi = torch.randn(n, 6, device=dev)[:, ::2]
    points = torch.randn(3, n, k - 1, device=dev).permute(2, 1, 0)
    crossed_at = (torch.arange(2 * n, device=dev) % k)[::2]
    # % 3 != 1: with != 0 the strided mask equalled its buffer's first n elements, so a kernel reading active with
    # stride 1 passed (mutation pass, 2026-12-04)
    active = (torch.arange(2 * n, device=dev) % 3 != 1)[::2]
    assert not torch.equal(active, (torch.arange(2 * n, device=dev) % 3 != 1)[:n])
    for mask in (None, active):
        want = [t.clone() for t in (lo, hi, points)]
        reference.boundary_search_step_(*want, crossed_at, mask)
        lo_v = lo.t().clone().t()
        hi_v = torch.empty(n, 6, device=dev)[:, ::2]
        hi_v.copy_(hi)
        pts_v = points.permute(2, 1, 0).clone().permute(2, 1, 0)
        assert not (lo_v.is_contiguous() or hi_v.is_contiguous() or pts_v.is_contiguous())
        triton_op()(lo_v, hi_v, pts_v, crossed_at, mask)
        for name, g, w in zip(("lo", "hi", "points"), (lo_v, hi_v, pts_v), want):
            assert_verbose_equal(g, w, name)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty(shape):
    lo, hi, points, _, _ = make_inputs(2, shape=shape, device=device())
    crossed_at = torch.zeros(shape[0], dtype=torch.int64, device=device())
    triton_op()(lo, hi, points, crossed_at, None)


def test_spans_several_blocks_per_sample():
    lo, hi, points, crossed_at, mask = make_inputs(3, shape=(4, 2500), device=device(), active=True)
    got, want = run_both(triton_op(), lo, hi, points, crossed_at, mask)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)


def test_grid_past_cudas_limit_is_refused_before_any_write(monkeypatch):
    """One program takes BLOCK (1024) positions of one sample, so lo of 2**31 one-element samples passes CUDA's
    2**31 - 1 programs (Triton's launcher: "OverflowError: signed integer is greater than maximum", no op or argument
    named; the C++ CUDA kernel's grid-stride loop has no limit). The limit lowered here: 3 samples of 2100 elements
    take 9 programs."""
    import robust_ops.triton._utils as triton_utils

    lo, hi, points, crossed, active = make_inputs(3, shape=(3, 2100), device=device(), active=True)
    originals = [t.clone() for t in (lo, hi, points)]
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 8)
    with pytest.raises(RuntimeError, match=re.escape(
        "boundary_search_step_triton: expected at most 8 programs (CUDA's limit on a 1-D grid) of 1024 elements of "
        "one sample each, got 9 for lo of 3 samples of 2100 elements; split the batch",
    )):
        triton_op()(lo, hi, points, crossed, active)
    for t, original, name in zip((lo, hi, points), originals, ("lo", "hi", "points")):
        assert_verbose_equal(t, original, name)
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 9)
    ours, ref = run_both(triton_op(), lo, hi, points, crossed, active)
    for got, want, name in zip(ours, ref, ("lo", "hi", "points")):
        assert_verbose_equal(got, want, name)


@pytest.mark.parametrize("k", [2, 3])
def test_search_keeps_label_flip_and_shrinks_by_k(k):
    n, d, rounds = 6, 8, 4
    g = torch.Generator().manual_seed(k)
    threshold = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    lo = torch.rand(n, d, generator=g, dtype=torch.float64) - 1.5
    hi = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.5
    points = torch.stack([lo * a + hi * b for a, b in reference.interpolation_weights(k)])
    width0 = (hi - lo).norm(dim=1)
    lo, hi, points, threshold = (t.to(device()) for t in (lo, hi, points, threshold))
    for r in range(1, rounds + 1):
        crossed_at = first_crossed(points.cpu(), threshold.cpu()).to(device())
        robust_ops.boundary_search_step_(lo, hi, points, crossed_at, backend="triton")
        assert not classify(lo, threshold).any() and classify(hi, threshold).all()
        torch.testing.assert_close((hi - lo).norm(dim=1).cpu(), width0 / k**r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("match,args", _bad_inputs())
def test_argument_errors(match, args):
    args = tuple(a.to(device()) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match="boundary_search_step_: expected " + match):
        triton_op()(*args)


def test_vmap_is_refused_by_name_as_on_the_other_backends():
    """test_boundary_search_step.py's test_vmap_is_refused_by_name_on_every_backend on the Triton backend (it raised
    "Batching rule not implemented for robust_ops::boundary_search_step_triton")."""
    lo, hi, points, crossed_at, _ = (t.to(device()) if t is not None else t for t in make_inputs(2))
    before = lo.clone()
    with pytest.raises(RuntimeError, match=r"^boundary_search_step_: expected hi outside torch\.func\.vmap, got a "):
        torch.func.vmap(lambda h: robust_ops.boundary_search_step_(lo, h, points, crossed_at, backend="triton"))(
            torch.stack([hi, hi]))
    assert torch.equal(lo, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check is an asynchronous device assert")
@pytest.mark.parametrize("k,bad", [(2, 2), (3, -1)])
def test_crossed_at_out_of_range(k, bad):
    lo, hi, points, crossed_at, _ = make_inputs(k)
    crossed_at[1] = bad
    before = [t.clone() for t in (lo, hi, points)]
    with pytest.raises(ValueError) as err:  # the native CPU kernel's error (a RuntimeError "got a value outside")
        triton_op()(lo, hi, points, crossed_at, None)
    want = f"boundary_search_step_: expected crossed_at in [0, {k - 1}] (k = {k}), got {bad} for sample 1"
    assert str(err.value) == want
    for t, b in zip((lo, hi, points), before):
        assert torch.equal(t, b)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("active", [False, True])
def test_opcheck(active):
    lo, hi, points, crossed_at, mask = make_inputs(3, device="cuda", active=active)
    torch.library.opcheck(triton_op(), (lo, hi, points, crossed_at, mask))


@pytest.mark.needs_cuda
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(lo, hi, points, crossed_at, active):
        triton_op()(lo, hi, points, crossed_at, active)
        return lo + hi

    lo, hi, points, crossed_at, mask = make_inputs(4, device="cuda", active=True)
    got = [t.clone() for t in (lo, hi, points)]
    out = step(*got, crossed_at, mask)
    want = [t.clone() for t in (lo, hi, points)]
    reference.boundary_search_step_(*want, crossed_at, mask)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)
    assert_verbose_equal(out, want[0] + want[1])


@pytest.mark.parametrize("name", ["lo", "hi", "points"])
def test_internal_overlap_rejected_before_any_write(name):
    """As the native kernels: an expanded lo/hi/points is refused up front (the launcher used to write hi and points,
    then fail copying back into an expanded lo)."""
    lo, hi, points, crossed_at, _ = make_inputs(2, shape=(4, 3), device=device())
    args = {"lo": lo, "hi": hi, "points": points}
    cpu_args = {k: v.cpu() for k, v in args.items()}
    args[name] = args[name][..., :1].expand_as(args[name])
    cpu_args[name] = cpu_args[name][..., :1].expand_as(cpu_args[name])  # .cpu() of an expanded CUDA tensor is dense
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(RuntimeError, match=f"boundary_search_step_: expected {name} without internal overlap") as got:
        triton_op()(*args.values(), crossed_at, None)
    for k, v in args.items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError) as native:
        NATIVE_OP(*cpu_args.values(), crossed_at.cpu(), None)
    assert str(got.value) == str(native.value)


@pytest.mark.parametrize("case", SHARING_CASES)
def test_written_tensors_sharing_memory_rejected_before_any_write(case):
    """As the native kernels: two of lo, hi, points sharing memory are refused up front, also one tensor passed as
    both lo and hi when it is not dense (the launcher's check skipped non-dense views and wrote lo, then hi)."""
    lo, hi, points, (first, second) = _sharing(case, device())
    crossed_at = torch.tensor([0, 1, 0, 1], device=device())
    before = [t.clone() for t in (lo, hi, points)]
    message = (f"boundary_search_step_: expected {first} and {second} not to share memory (both are written in "
               "place); clone() one of them first")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        triton_op()(lo, hi, points, crossed_at, None)
    assert all(torch.equal(t, b) for t, b in zip((lo, hi, points), before))


@pytest.mark.parametrize("name", ["hi", "points", "crossed_at", "active"])
def test_device_mismatch(name):
    """The C++ kernels' device checks, same messages (a meta tensor stands in for another device)."""
    lo, hi, points, crossed_at, active = make_inputs(2, shape=(4, 3), device=device(), active=True)
    args = {"lo": lo, "hi": hi, "points": points, "crossed_at": crossed_at, "active": active}
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=rf"boundary_search_step_: expected {name} on the device of lo \({lo.device}"
                       r"\), got meta"):
        triton_op()(*args.values())


@pytest.mark.parametrize("argument", ["lo", "hi", "points"])
def test_refuses_an_argument_requiring_grad_under_grad_mode(argument):
    check_refuses_argument_requiring_grad(triton_op(), "boundary_search_step_triton", argument, device())


def test_runs_without_grad_mode_and_bumps_versions():
    check_runs_without_grad_mode_and_bumps_versions(triton_op(), device())


def test_backward_sees_the_mutation():
    check_backward_sees_the_mutation(triton_op(), device())


@pytest.mark.parametrize("name", ["lo", "hi", "points", "crossed_at", "active"])
def test_arguments_that_are_not_strided_are_refused_by_name(name):
    """A sparse argument of the direct op met torch's errors ("Cannot access storage of SparseTensorImpl", a sparse
    kernel missing), naming neither op nor argument; refused in one line, before anything is written."""
    check_refuses_a_sparse_argument(
        triton_op(), name,
        f"boundary_search_step_triton: expected {name} to be a strided (dense) tensor, got torch.sparse_coo; there is "
        "no Triton kernel for it: convert with .to_dense()",
        device=device(),
    )
