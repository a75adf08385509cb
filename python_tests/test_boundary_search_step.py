"""boundary_search_step_ (native CPU/CUDA kernels): bitwise equality with robust_ops.reference, search properties,
opcheck, torch.compile and every argument check."""

import re

import pytest
import torch

import robust_ops
from robust_ops import reference
from robust_ops._meta import check_boundary_search_step_args

from conftest import cpu_and_cuda
from utils import (TOLERANCES, assert_verbose_equal, check_in_place_op_mutation_is_seen_by_backward,
                   check_in_place_op_rejected_call_bumps_no_version,
                   check_in_place_op_refuses_argument_requiring_grad,
                   check_in_place_op_runs_outside_grad_mode_and_bumps_versions, record_backend_requests)

OP = torch.ops.robust_ops.boundary_search_step_
ARITIES = (2, 3, 4, 8)


def make_inputs(k, shape=(5, 3, 4), dtype=torch.float32, device="cpu", active=False, crossed=None, seed=0):
    """lo, hi, points [k-1, ...] (the interior points of [lo, hi]), crossed_at covering every value, active mask."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    lo = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    hi = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    points = torch.stack([lo * w_lo + hi * w_hi for w_lo, w_hi in reference.interpolation_weights(k)])
    if crossed is None:
        crossed = torch.arange(n) % k  # every value 0..k-1 appears when n >= k
    crossed_at = torch.as_tensor(crossed, dtype=torch.int64).to(device)
    mask = (torch.arange(n) % 3 != 1).to(device) if active else None
    return lo, hi, points, crossed_at, mask


def run_both(op, lo, hi, points, crossed_at, active):
    """Run op on clones of (lo, hi, points) and the reference on others; return both results."""
    got = [t.clone() for t in (lo, hi, points)]
    want = [t.clone() for t in (lo, hi, points)]
    op(*got, crossed_at, active)
    reference.boundary_search_step_(*want, crossed_at, active)
    return got, want


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", ARITIES)
@pytest.mark.parametrize("active", [False, True])
def test_matches_reference_bitwise(device, dtype, k, active):
    lo, hi, points, crossed_at, mask = make_inputs(k, shape=(2 * k + 1, 3, 5), dtype=dtype, device=device,
                                                   active=active)
    got, want = run_both(OP, lo, hi, points, crossed_at, mask)
    for name, g, w in zip(("lo", "hi", "points"), got, want):
        assert_verbose_equal(g, w, name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("k", [2, 4])
def test_random_points_and_special_values(device, k):
    """Arbitrary (not interpolated) points, negative zeros, infinities and NaN propagate exactly like the reference."""
    n = 4 * k
    lo = torch.randn(n, 7, dtype=torch.float32)
    hi = torch.randn(n, 7)
    points = torch.randn(k - 1, n, 7)
    lo[0, 0], hi[1, 1], points[0, 2, 2], lo[3, 3] = -0.0, float("inf"), float("nan"), float("-inf")
    crossed_at = torch.randint(0, k, (n,))
    mask = torch.rand(n) > 0.3
    for m in (None, mask):
        got, want = run_both(OP, lo.to(device), hi.to(device), points.to(device), crossed_at.to(device),
                             None if m is None else m.to(device))
        for name, g, w in zip(("lo", "hi", "points"), got, want):
            assert_verbose_equal(g, w, name)
            assert torch.equal(torch.signbit(g), torch.signbit(w)), name


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
def test_reduced_precision(device, dtype, k):
    lo, hi, points, crossed_at, mask = make_inputs(k, shape=(7, 2, 9), dtype=dtype, device=device, active=True)
    got, want = run_both(OP, lo, hi, points, crossed_at, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCES[dtype])
        # Both native kernels round exactly like eager (products rounded to the dtype, sum in float; CUDA through
        # __fmul_rn/__fadd_rn), and eager runs on the same device: bitwise there too (the CUDA half asserted only
        # closeness, so a CUDA rounding that drifted from the CPU kernel's would have passed).
        assert_verbose_equal(g, w)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("k", [2, 4])
def test_non_contiguous(device, k):
    """Permuted / strided lo, hi, points, crossed_at and active: results land in the original storage."""
    n = 6
    base = [torch.randn(4, 5, n, 2, device=device) for _ in range(2)]
    lo, hi = (b.permute(2, 0, 1, 3)[..., 0] for b in base)  # [n, 4, 5], non-contiguous
    points = torch.randn(4, n, k - 1, 5, device=device).permute(2, 1, 0, 3)  # [k-1, n, 4, 5]
    crossed_at = (torch.arange(2 * n, device=device) % k)[::2]
    active = (torch.arange(2 * n, device=device) % 4 != 2)[::2]
    assert not (lo.is_contiguous() or hi.is_contiguous() or points.is_contiguous() or crossed_at.is_contiguous())
    for mask in (None, active):
        want = [t.clone() for t in (lo, hi, points)]
        reference.boundary_search_step_(*want, crossed_at, mask)
        got = [t.clone() for t in (base[0], base[1])]
        lo_v, hi_v = (b.permute(2, 0, 1, 3)[..., 0] for b in got)
        pts = points.clone().permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)  # another non-contiguous layout
        OP(lo_v, hi_v, pts, crossed_at, mask)
        for name, g, w in zip(("lo", "hi", "points"), (lo_v, hi_v, pts), want):
            assert_verbose_equal(g, w, name)
        assert torch.equal(got[0][..., 1], base[0][..., 1])  # the other half of the storage is untouched


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_large_batch_spans_parallel_chunks(device):
    """Per-sample size not a multiple of the parallel grain: chunks split samples mid-way. On CUDA each sample spans
    13 tiles of 1024 positions, the last partial (the other tests' samples fit in one tile)."""
    lo, hi, points, crossed_at, mask = make_inputs(3, shape=(5, 13001), device=device, active=True)
    got, want = run_both(OP, lo, hi, points, crossed_at, mask)
    for name, g, w in zip(("lo", "hi", "points"), got, want):
        assert_verbose_equal(g, w, name)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_tiles_beyond_the_cuda_grid_match_the_reference_exactly(device):
    """66000 one-tile samples: more tiles than the CUDA kernel's grid of at most 65535 blocks, so blocks take a second
    tile in its grid-stride loop, each with its own sample's crossed_at and active flag."""
    lo, hi, points, crossed_at, mask = make_inputs(4, shape=(66000, 3), device=device, active=True)
    got, want = run_both(OP, lo, hi, points, crossed_at, mask)
    for name, g, w in zip(("lo", "hi", "points"), got, want):
        assert_verbose_equal(g, w, name)


def test_parallel_chunks_split_a_sample_between_threads():
    """The test above with two threads (it runs on one under OMP_NUM_THREADS=1): 5 * 13001 positions make two
    chunks of the 32768 grain, the first ending inside sample 2 (crossed_at = k-1, so it rewrites lo and the points
    it reads). A chunk must stop at its own end: the other chunk updates the rest of that sample."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        lo, hi, points, crossed_at, _ = make_inputs(3, shape=(5, 13001))
        assert crossed_at[2] == 2 and 2 * 13001 < 32768 < 3 * 13001
        got, want = run_both(OP, lo, hi, points, crossed_at, None)
    finally:
        torch.set_num_threads(threads)
    for name, g, w in zip(("lo", "hi", "points"), got, want):
        assert_verbose_equal(g, w, name)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0), (4,)])
def test_empty_and_1d(device, shape):
    k = 3
    lo, hi, points, _, _ = make_inputs(k, shape=shape, device=device)
    crossed_at = (torch.arange(shape[0]) % k).to(device)
    active = torch.ones(shape[0], dtype=torch.bool, device=device)
    got, want = run_both(OP, lo, hi, points, crossed_at, active)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)


def test_inactive_samples_untouched_and_active_moved():
    k = 4
    lo, hi, points, crossed_at, _ = make_inputs(k, shape=(8, 6))
    active = torch.tensor([True, False] * 4)
    before = [t.clone() for t in (lo, hi, points)]
    OP(lo, hi, points, crossed_at, active)
    for t, b in zip((lo, hi, points), before):
        assert torch.equal(t[..., ~active, :] if t is points else t[~active], b[..., ~active, :] if t is points
                           else b[~active])
    for n in active.nonzero().flatten().tolist():
        c = int(crossed_at[n])
        stacked = torch.cat([before[0][None, n], before[2][:, n], before[1][None, n]])
        assert torch.equal(lo[n], stacked[c]) and torch.equal(hi[n], stacked[c + 1])


def classify(x, threshold):
    """Synthetic 1-D classifier on [..., N, D]: a point has crossed the boundary iff its mean exceeds threshold[n]."""
    return x.mean(-1) > threshold


def first_crossed(points, threshold):
    """crossed_at: index of the first crossed interior point in lo -> hi order, k-1 when none crossed."""
    crossed = classify(points, threshold)  # [k-1, N]
    km1 = points.shape[0]
    order = torch.arange(km1).view(km1, 1).expand_as(crossed)
    return torch.where(crossed, order, km1).amin(0)


@pytest.mark.parametrize("k", ARITIES)
@pytest.mark.parametrize("masked", [False, True])
def test_search_keeps_label_flip_and_shrinks_by_k(k, masked):
    n, d, rounds = 16, 10, 6
    g = torch.Generator().manual_seed(k)
    threshold = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    lo = torch.rand(n, d, generator=g, dtype=torch.float64) - 1.5  # mean < -0.5 <= threshold: not crossed
    hi = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.5  # mean > 0.5 > threshold: crossed
    points = torch.stack([lo * a + hi * b for a, b in reference.interpolation_weights(k)])
    active = torch.arange(n) % 2 == 0 if masked else None
    width0 = (hi - lo).norm(dim=1)
    lo0, hi0 = lo.clone(), hi.clone()
    for r in range(1, rounds + 1):
        robust_ops.boundary_search_step_(lo, hi, points, first_crossed(points, threshold), active, backend="native")
        assert not classify(lo, threshold).any() and classify(hi, threshold).all()
        width = (hi - lo).norm(dim=1)
        expected = width0 / k**r if active is None else torch.where(active, width0 / k**r, width0)
        torch.testing.assert_close(width, expected, rtol=1e-9, atol=1e-12)
        # the interval stays on the original segment: lo/hi are lo0 + s * (hi0 - lo0)
        s = ((lo - lo0) / (hi0 - lo0)).mean(1, keepdim=True)
        torch.testing.assert_close(lo, lo0 + s * (hi0 - lo0), rtol=1e-9, atol=1e-9)


def test_functional_wrapper_backends_agree():
    lo, hi, points, crossed_at, mask = make_inputs(3, active=True)
    a = [t.clone() for t in (lo, hi, points)]
    b = [t.clone() for t in (lo, hi, points)]
    out = robust_ops.boundary_search_step_(*a, crossed_at, mask, backend="native")
    assert all(o is t for o, t in zip(out, a))
    robust_ops.boundary_search_step_(*b, crossed_at, mask, backend="reference")
    for x, y in zip(a, b):
        assert_verbose_equal(x, y)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("active", [False, True])
def test_opcheck(device, active):
    lo, hi, points, crossed_at, mask = make_inputs(3, device=device, active=active)
    torch.library.opcheck(OP, (lo, hi, points, crossed_at, mask))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(lo, hi, points, crossed_at, active):
        OP(lo, hi, points, crossed_at, active)
        return lo + hi

    lo, hi, points, crossed_at, mask = make_inputs(4, device=device, active=True)
    got = [t.clone() for t in (lo, hi, points)]
    out = step(*got, crossed_at, mask)
    want = [t.clone() for t in (lo, hi, points)]
    reference.boundary_search_step_(*want, crossed_at, mask)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)
    assert_verbose_equal(out, want[0] + want[1])


def test_torch_compile_functional_wrapper():
    torch._dynamo.reset()
    step = torch.compile(robust_ops.boundary_search_step_, fullgraph=True, backend="aot_eager")
    lo, hi, points, crossed_at, mask = make_inputs(2, active=True)
    got = [t.clone() for t in (lo, hi, points)]
    step(*got, crossed_at, mask)
    want = [t.clone() for t in (lo, hi, points)]
    reference.boundary_search_step_(*want, crossed_at, mask)
    for g, w in zip(got, want):
        assert_verbose_equal(g, w)


def _bad_inputs():
    lo = torch.zeros(4, 3)
    hi = torch.zeros(4, 3)
    pts = torch.zeros(1, 4, 3)
    c = torch.zeros(4, dtype=torch.int64)
    return [
        ("lo to be a floating-point tensor", (lo.long(), hi.long(), pts.long(), c, None)),
        (r"lo to be a floating-point tensor \(float16, bfloat16, float32, float64\), got torch.float8_e4m3fn",
         tuple(t.to(torch.float8_e4m3fn) for t in (lo, hi, pts)) + (c, None)),
        ("lo to have a batch dimension", (torch.zeros(()), torch.zeros(()), torch.zeros(1), c, None)),
        ("hi to have the shape and dtype of lo", (lo, torch.zeros(4, 2), pts, c, None)),
        ("hi to have the shape and dtype of lo", (lo, hi.double(), pts, c, None)),
        (r"points to be \[k-1, 4, 3\] with k >= 2", (lo, hi, torch.zeros(0, 4, 3), c, None)),
        (r"points to be \[k-1, 4, 3\] with k >= 2", (lo, hi, torch.zeros(4, 3), c, None)),
        (r"points to be \[k-1, 4, 3\] with k >= 2", (lo, hi, torch.zeros(2, 4, 2), c, None)),
        (r"points to be \[k-1, 4, 3\] with k >= 2", (lo, hi, pts.half(), c, None)),
        (r"crossed_at to be an int64 tensor of shape \[4\]", (lo, hi, pts, c.int(), None)),
        (r"crossed_at to be an int64 tensor of shape \[4\]", (lo, hi, pts, c[:3], None)),
        # [4, 1] holds 4 values but is not [4] (mutation testing: the dim() checks of crossed_at/active survived)
        (r"crossed_at to be an int64 tensor of shape \[4\]", (lo, hi, pts, c.unsqueeze(1), None)),
        (r"active to be a bool tensor of shape \[4\]", (lo, hi, pts, c, torch.ones(4))),
        (r"active to be a bool tensor of shape \[4\]", (lo, hi, pts, c, torch.ones(5, dtype=torch.bool))),
        (r"active to be a bool tensor of shape \[4\]", (lo, hi, pts, c, torch.ones(4, 1, dtype=torch.bool))),
    ]


@pytest.mark.parametrize("match,args", _bad_inputs())
def test_argument_errors_match_fake(match, args):
    """Each check raises with the op and argument named, and with exactly the fake kernel's message."""
    with pytest.raises(RuntimeError, match="boundary_search_step_: expected " + match) as native:
        OP(*args)
    with pytest.raises(RuntimeError) as fake:
        check_boundary_search_step_args(*args)
    assert str(native.value) == str(fake.value)
    with pytest.raises(RuntimeError, match="boundary_search_step_: expected " + match):
        robust_ops.boundary_search_step_(*args, backend="native")


@pytest.mark.parametrize("k,bad", [(2, 2), (2, -1), (4, 4), (4, -3)])
def test_crossed_at_out_of_range(k, bad):
    lo, hi, points, crossed_at, _ = make_inputs(k)
    crossed_at[3] = bad
    before = [t.clone() for t in (lo, hi, points)]
    with pytest.raises(ValueError, match=rf"boundary_search_step_: expected crossed_at in \[0, {k - 1}\].*got {bad} "
                       r"for sample 3"):
        OP(lo, hi, points, crossed_at, None)
    for t, b in zip((lo, hi, points), before):  # nothing written before the check
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("k,crossed,active,message", [
    (4, [4, 0, 0, 0, 1], None, r"expected crossed_at in [0, 3] (k = 4), got 4 for sample 0"),
    (4, [0, -1, 0, 9, 1], None, r"expected crossed_at in [0, 3] (k = 4), got -1 for sample 1"),
    (2, [0, 1, 1, 0, 2], [True, True, True, True, False], r"expected crossed_at in [0, 1] (k = 2), got 2 for sample 4"),
])
def test_crossed_at_out_of_range_is_refused_alike_on_every_backend(backend, k, crossed, active, message):
    """One message for the rule on every CPU backend (test_boundary_search_step_triton.py: the interpreted Triton
    one), naming k, the value and its sample; the reference said only "expected crossed_at in [0, 3]" and the Triton
    launcher "got a value outside that range". Nothing is written."""
    lo, hi, points, crossed_at, _ = make_inputs(k, crossed=crossed)
    mask = None if active is None else torch.tensor(active)
    before = [t.clone() for t in (lo, hi, points)]
    with pytest.raises(ValueError) as err:
        robust_ops.boundary_search_step_(lo, hi, points, crossed_at, mask, backend=backend)
    assert str(err.value) == "boundary_search_step_: " + message
    for t, b in zip((lo, hi, points), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_vmap_is_refused_by_name_on_every_backend(backend):
    """No batching rule: the functional form names the vmapped argument on every backend before anything is written
    (native: "Batching rule not implemented for robust_ops::boundary_search_step_", reference: "... for
    aten::_debug_has_internal_overlap")."""
    lo, hi, points, crossed_at, _ = make_inputs(2)
    his = torch.stack([hi, hi])
    before = [t.clone() for t in (lo, points)]

    def step(h):
        robust_ops.boundary_search_step_(lo, h, points, crossed_at, backend=backend)
        return h

    with pytest.raises(RuntimeError) as err:
        torch.func.vmap(step)(his)
    assert str(err.value) == (
        "boundary_search_step_: expected hi outside torch.func.vmap, got a tensor vmapped over; the op has no batching "
        "rule and works per sample already: fold the vmapped dimension into the batch (N) dimension and call it once")
    assert all(torch.equal(t, b) for t, b in zip((lo, points), before)) and torch.equal(his[0], hi)


@pytest.mark.parametrize("shape,active", [((5, 3, 4), [True, False, True, True, True]), ((5, 0), None)])
def test_crossed_at_out_of_range_for_an_inactive_or_empty_sample(shape, active):
    """Every sample's index is checked, also one that is not moved or has no elements: the CUDA kernel asserts before
    skipping an inactive sample and checks asynchronously when there are no elements, so the CPU kernel must too."""
    lo, hi, points, crossed_at, _ = make_inputs(2, shape=shape, crossed=[0, 2, 1, 0, 1])
    mask = None if active is None else torch.tensor(active)
    with pytest.raises(ValueError, match=r"boundary_search_step_: expected crossed_at in \[0, 1\].*got 2 for sample 1"):
        OP(lo, hi, points, crossed_at, mask)
    with pytest.raises(ValueError, match=r"boundary_search_step_: expected crossed_at in \[0, 1\].*got 2 for sample 1"):
        reference.boundary_search_step_(lo, hi, points, crossed_at, mask)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [(5, 3, 4), (5, 0)])
def test_native_step_does_not_synchronize_on_cuda(shape):
    """IMA calls the step every search round: on CUDA it must not wait for the GPU, neither with elements (the
    kernel's device assert) nor without (the asynchronous crossed_at check). torch raises on a synchronizing call in
    sync debug mode "error"."""
    args = make_inputs(3, shape=shape, device="cuda", active=True)
    OP(*args)  # warm-up: the first call may load the module
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OP(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.needs_cuda
def test_device_mismatch():
    lo, hi, points, crossed_at, _ = make_inputs(2, device="cuda")
    with pytest.raises(RuntimeError, match="boundary_search_step_: expected crossed_at on the device of lo"):
        OP(lo, hi, points, crossed_at.cpu(), None)


@pytest.mark.parametrize("name", ["lo", "hi", "points"])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_internal_overlap_rejected_before_any_write(name, backend):
    """An expanded lo, hi or points (several elements, one memory location) is refused before anything is written;
    the kernels used to update hi/points in place and fail only when copying back into an expanded lo."""
    lo, hi, points, crossed_at, _ = make_inputs(2, shape=(4, 3))  # crossed_at 0, 1, 0, 1: every tensor is written
    args = {"lo": lo, "hi": hi, "points": points}
    args[name] = args[name][..., :1].expand_as(args[name])
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(RuntimeError, match=f"boundary_search_step_: expected {name} without internal overlap") as got:
        robust_ops.boundary_search_step_(*args.values(), crossed_at, backend=backend)
    for k, v in args.items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError) as fake:
        check_boundary_search_step_args(*args.values(), crossed_at, None)
    assert str(got.value) == str(fake.value)
    # ATen's own text (what the reference's copy_ raises) is part of the message.
    assert "more than one element of the written-to tensor refers to a single memory location" in str(got.value)


def _sharing(case, device="cpu"):
    """lo, hi, points (k = 2, N = 4) where two of the written tensors share memory."""
    lo, hi, points, _, _ = make_inputs(2, shape=(4, 3), device=device)
    if case == "hi is lo":
        return lo, lo, points, ("lo", "hi")
    if case == "hi is a strided lo":  # not dense: ATen's identity rule still applies (the check ignored it)
        lo, _, points, _, _ = make_inputs(2, shape=(4, 6), device=device)
        lo = lo[:, ::2]
        return lo, lo, points[:, :, ::2].contiguous(), ("lo", "hi")
    if case == "lo and hi overlap":  # two views of one buffer, rows 2..3 of lo are rows 0..1 of hi
        buf = torch.cat([lo, hi[2:]])
        return buf[:4], buf[2:], points, ("lo", "hi")
    return lo, points[0], points, ("hi", "points")  # "hi is points[0]"


SHARING_CASES = ["hi is lo", "hi is a strided lo", "lo and hi overlap", "hi is points[0]"]


@pytest.mark.parametrize("case", SHARING_CASES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_written_tensors_sharing_memory_rejected_before_any_write(case, backend):
    """lo, hi and points are all written in place: two sharing memory have no single result (hi passed as lo gave
    the native kernel's lo and the reference's hi), so they are refused, as pgd_step_ refuses a partly shared slot."""
    lo, hi, points, (first, second) = _sharing(case)
    crossed_at = torch.tensor([0, 1, 0, 1])
    before = [t.clone() for t in (lo, hi, points)]
    message = (f"boundary_search_step_: expected {first} and {second} not to share memory (both are written in "
               "place); clone() one of them first")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        robust_ops.boundary_search_step_(lo, hi, points, crossed_at, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip((lo, hi, points), before))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        check_boundary_search_step_args(lo, hi, points, crossed_at, None)


@pytest.mark.parametrize("name", ["hi", "points", "crossed_at", "active"])
def test_device_mismatch_in_the_shared_checks(name):
    """The fake kernel and the Triton launcher share these checks, with csrc/checks.h's messages (a meta tensor stands
    in for another device; the native op dispatches it to the fake kernel)."""
    lo, hi, points, crossed_at, active = make_inputs(2, shape=(4, 3), active=True)
    args = {"lo": lo, "hi": hi, "points": points, "crossed_at": crossed_at, "active": active}
    args[name] = args[name].to("meta")
    match = rf"boundary_search_step_: expected {name} on the device of lo \(cpu\), got meta"
    with pytest.raises(RuntimeError, match=match):
        check_boundary_search_step_args(*args.values())
    with pytest.raises(RuntimeError, match=match):
        OP(*args.values())


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_meta_tensors(backend):
    """Shape inference as for drop_max_pool2d (the native op runs its fake kernel); the reference read crossed_at's
    values for its range check and failed with torch's "Tensor.item() cannot be called on meta tensors"."""
    lo, hi, points, crossed_at, active = (t.to("meta") for t in make_inputs(3, shape=(2, 3), active=True))
    out = robust_ops.boundary_search_step_(lo, hi, points, crossed_at, active, backend=backend)
    assert [t.shape for t in out] == [(2, 3), (2, 3), (2, 2, 3)] and all(t.is_meta for t in out)


def test_functional_wrapper_forwards_backend(monkeypatch):
    requested = record_backend_requests(monkeypatch)
    lo, hi, points, crossed_at, mask = make_inputs(3, active=True)
    for backend in ("reference", "native"):
        robust_ops.boundary_search_step_(lo.clone(), hi.clone(), points.clone(), crossed_at, mask, backend=backend)
    assert requested == [("boundary_search_step_", "reference"), ("boundary_search_step_", "native")]


def test_functional_wrapper_refuses_a_non_tensor_lo_by_name():
    # lo.device used to fail first, with an AttributeError naming neither the op nor the argument.
    with pytest.raises(TypeError, match="boundary_search_step_: expected lo to be a tensor, got list"):
        robust_ops.boundary_search_step_([0.0], torch.zeros(1, 1), torch.zeros(1, 1, 1),
                                         torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("name,value,kind", [("hi", [1.0], "a tensor"), ("points", 0.5, "a tensor"),
                                             ("crossed_at", [0, 1], "a tensor"), ("active", [True, False],
                                                                                  "a tensor or None")])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_functional_wrapper_refuses_non_tensors_by_name(name, value, kind, backend):
    """The same TypeError on every backend: backend="reference" raised AttributeError ('list' object has no attribute
    'shape'), naming neither op nor argument; the native op its schema's text."""
    lo, hi, points, crossed_at, active = make_inputs(2, shape=(2, 3), active=True)
    args = {"lo": lo, "hi": hi, "points": points, "crossed_at": crossed_at, "active": active, name: value}
    message = f"boundary_search_step_: expected {name} to be {kind}, got {type(value).__name__}"
    with pytest.raises(TypeError, match=re.escape(message)):
        robust_ops.boundary_search_step_(*args.values(), backend=backend)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd: no gradient (tensors requiring grad refused under grad mode), version counter bumped
# (robust_ops._autograd.register_in_place_without_gradient; the Triton tests reuse these checks)


def search_step_arguments(device="cpu"):
    lo, hi, points, crossed_at, active = make_inputs(3, device=device, active=True)
    return dict(lo=lo, hi=hi, points=points, crossed_at=crossed_at, active=active)


SEARCH_MUTATED = ("lo", "hi", "points")


def check_refuses_argument_requiring_grad(op, name, argument, device="cpu"):
    check_in_place_op_refuses_argument_requiring_grad(op, name, lambda: search_step_arguments(device),
                                                      SEARCH_MUTATED, argument)


def check_runs_without_grad_mode_and_bumps_versions(op, device="cpu"):
    check_in_place_op_runs_outside_grad_mode_and_bumps_versions(op, lambda: search_step_arguments(device),
                                                                SEARCH_MUTATED)


def check_backward_sees_the_mutation(op, device="cpu"):
    check_in_place_op_mutation_is_seen_by_backward(op, lambda: search_step_arguments(device), "hi")


@pytest.mark.parametrize("argument", ["lo", "hi", "points"])
def test_refuses_an_argument_requiring_grad_under_grad_mode(argument):
    check_refuses_argument_requiring_grad(OP, "boundary_search_step_", argument)


def test_runs_without_grad_mode_and_bumps_versions():
    check_runs_without_grad_mode_and_bumps_versions(OP)


def test_backward_sees_the_mutation():
    check_backward_sees_the_mutation(OP)


def test_a_rejected_call_bumps_no_version():
    check_in_place_op_rejected_call_bumps_no_version(OP, search_step_arguments, SEARCH_MUTATED,
                                                     {"crossed_at": torch.full((5,), 9)}, "expected crossed_at in")


def check_refuses_a_sparse_argument(step, name, message, device="cpu"):
    """step(lo, hi, points, crossed_at, active) with the argument `name` sparse raises `message`, before anything is
    written (also the Triton op's test)."""
    lo, hi, points, crossed_at, active = make_inputs(3, device=device, active=True)
    values = dict(lo=lo, hi=hi, points=points, crossed_at=crossed_at, active=active)
    before = {key: values[key].clone() for key in ("lo", "hi", "points")}
    args = dict(values, **{name: values[name].to_sparse()})
    with pytest.raises(RuntimeError, match=re.escape(message)):
        step(*args.values())
    for key, t in before.items():
        assert_verbose_equal(values[key], t, key)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", ["lo", "hi", "points", "crossed_at", "active"])
def test_functional_refuses_arguments_that_are_not_strided_by_name(backend, name):
    """A sparse argument of robust_ops.boundary_search_step_ got the dispatcher's many-line "Could not run
    'robust_ops::boundary_search_step_' with arguments from the 'SparseCPU' backend" (native) or torch's errors
    (reference: a sparse lo "expected lo without internal overlap"); refused in one line naming the argument."""
    check_refuses_a_sparse_argument(
        lambda *args: robust_ops.boundary_search_step_(*args, backend=backend), name,
        f"boundary_search_step_: expected {name} to be a strided (dense) tensor, got torch.sparse_coo; there is no "
        "boundary_search_step_ kernel for it: convert with .to_dense()",
    )
