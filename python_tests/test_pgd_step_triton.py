"""robust_ops::pgd_step_triton: the same results as the reference (bitwise in float32/float64) and the same schema as
the C++ op. Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (small shapes: the interpreter is slow)."""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robust_ops
from robust_ops import reference
from robust_ops._meta import check_pgd_step_args
from test_pgd_step import (
    PGD_TENSOR_ARGUMENTS,
    check_backward_sees_the_mutation,
    check_clip_bounds_beyond_the_dtype,
    check_l2_batch_innermost_layout,
    check_per_sample_values_sharing_written_memory,
    check_refuses_a_non_leaf_x_adv,
    check_refuses_argument_requiring_grad,
    check_runs_without_grad_mode_and_bumps_versions,
    make_inputs,
    opmath_chain,
    torchattacks_pgd_step,
    torchattacks_pgdl2_step,
)
from utils import TOLERANCES, assert_verbose_equal

pytestmark = pytest.mark.triton

NORMS = ("linf", "l2")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_op():
    return torch.ops.robust_ops.pgd_step_triton


def run_both(x_adv, x_nat, grad, alpha, eps, clip, norm, history=None, slot=0):
    ours, ref = x_adv.clone(), x_adv.clone()
    h_ours = None if history is None else history.clone()
    h_ref = None if history is None else history.clone()
    triton_op()(ours, x_nat, grad, alpha, eps, clip[0], clip[1], norm, h_ours, slot)
    reference.pgd_step_(ref, x_nat, grad, alpha, eps, clip[0], clip[1], norm, h_ref, slot)
    return (ours, h_ours), (ref, h_ref)


def test_schema_matches_native_apart_from_name():
    native = torch.ops.robust_ops.pgd_step_.default._schema
    ours = triton_op().default._schema
    assert ours.name.endswith("pgd_step_triton") and native.name.endswith("pgd_step_")

    def describe(schema):
        args = [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments]
        return args, [str(r.type) for r in schema.returns]

    assert describe(ours) == describe(native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(3,), (2, 3, 5, 7), (3, 1, 40, 33)])
def test_matches_reference_exactly(dtype, norm, shape):
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, dtype, device(), seed=sum(shape), zero_grad=(1,))
    history = torch.full((3,) + shape, -7.0, dtype=dtype, device=device())
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, slot=2)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours, h_ref, "history")


@pytest.mark.parametrize("norm", NORMS)
def test_samples_of_whole_blocks(norm):
    """Per-sample sizes that fill their blocks (BLOCK = 1024): a block start off by one still covers 1320 elements in
    two blocks, not 2048 (found by the mutation pass)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 1024), device=device(), seed=5, zero_grad=(1,))
    history = torch.full((2, 3, 2, 1024), -7.0, device=device())
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, slot=1)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours, h_ref, "history")


@pytest.mark.parametrize("norm", NORMS)
def test_clip_range_and_eps_zero(norm):
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 2, 6, 6), device=device(), clip=(-1.0, 2.0), scale=0.4)
    eps[1] = 0
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (-0.5, 1.5), norm)
    assert_verbose_equal(ours, ref)
    assert_verbose_equal(ours[1], x_nat[1].clamp(-0.5, 1.5))


@pytest.mark.parametrize("norm", NORMS)
def test_history_slot_holds_the_clipped_result(norm):
    """Steps that leave the clip range: history[slot] gets the clipped x_adv (a kernel storing the unclipped sum in
    the slot passed every other test, found by the mutation pass)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 2, 6, 6), device=device(), clip=(-1.0, 2.0), scale=0.4)
    alpha, eps = alpha * 10, eps * 10
    history = torch.full((2, 4, 2, 6, 6), -7.0, device=device())
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (-0.5, 1.5), norm, history, slot=1)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours, h_ref, "history")
    assert bool(((ref == -0.5) | (ref == 1.5)).any())


@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_in_place(norm):
    shape = (2, 3, 6, 5)
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, device=device())
    _, (expected, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm)
    x_cl = x_adv.contiguous(memory_format=torch.channels_last)
    grad_t = grad.transpose(2, 3).contiguous().transpose(2, 3)
    history = torch.zeros((2, 2) + shape[1:], device=device()).transpose(0, 1)
    # alpha and eps strided too: the kernels load them at n, so the launcher makes them contiguous (without that,
    # every test passed: mutation pass, 2026-12-04)
    alpha_s, eps_s = (torch.stack([v.flip(0), v], 1)[:, 1] for v in (alpha, eps))
    triton_op()(x_cl, x_nat, grad_t, alpha_s, eps_s, 0.0, 1.0, norm, history, 1)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    assert_verbose_equal(x_cl, expected)
    assert_verbose_equal(history[1], expected)


@pytest.mark.parametrize("norm", NORMS)
def test_float64_clip_bounds_are_not_rounded_to_float32(norm):
    """The clip bounds are clamped to in the opmath dtype: 0.1 and 0.7 are not float32 values, so float64 results at
    the bounds are the float64 bounds (bounds in float32 passed every test, whose bounds were float32 values: mutation
    pass, 2026-12-04)."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 2, 6, 6), torch.float64, device(), clip=(0.0, 0.8), scale=0.4)
    alpha, eps = alpha * 10, eps * 10
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.1, 0.7), norm)
    assert_verbose_equal(ours, ref)
    assert bool((ref == 0.1).any()) and bool((ref == 0.7).any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("norm", NORMS)
def test_clip_bounds_beyond_the_dtype(dtype, norm):
    check_clip_bounds_beyond_the_dtype(triton_op(), dtype, norm, device())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["batch_innermost", "transposed_2d"])
def test_l2_batch_innermost_layout_matches_reference_exactly(dtype, layout):
    check_l2_batch_innermost_layout(triton_op(), dtype, layout, device())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_reduced_precision(dtype, norm):
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 5, 5), dtype, device(), scale=0.02)
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol["rtol"], atol=2 * tol["atol"])
    # Zero gradient: no NaN (torchattacks' float16 chain gives NaN here: ||g|| + 1e-10 underflows to 0).
    zero = x_adv.clone()
    triton_op()(zero, x_nat, torch.zeros_like(grad), alpha, eps + 1, 0.0, 1.0, norm, None, 0)
    assert not bool(torch.isnan(zero).any())
    torch.testing.assert_close(zero, x_adv, rtol=0, atol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("norm", NORMS)
def test_float16_rounds_each_intermediate(norm):
    """Bitwise against test_pgd_step's opmath_chain (each intermediate rounded to float16, as the C++ op): the
    tolerance of test_reduced_precision let a dropped rounding of step, stepped, diff, moved or the scaled delta pass
    (found by the mutation pass). float16 only: the interpreter truncates float32 -> bfloat16 instead of rounding."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((4, 3, 8, 8), torch.float16, device(), seed=3, zero_grad=(2,),
                                                 scale=0.02)
    for clip in ((0.0, 1.0), (0.25, 0.75)):
        expected = opmath_chain(x_adv, x_nat, grad, alpha, eps, clip, norm)
        ours = x_adv.clone()
        triton_op()(ours, x_nat, grad, alpha, eps, clip[0], clip[1], norm, None, 0)
        assert_verbose_equal(ours, expected)
        assert not torch.equal(ours, x_adv)


@pytest.mark.parametrize("norm", NORMS)
def test_bitwise_equal_to_torchattacks_chain(norm):
    x_adv, x_nat, grad, _, _ = make_inputs((4, 3, 8, 8), device=device(), scale=0.02)
    alpha, eps = (2 / 255, 8 / 255) if norm == "linf" else (0.1, 0.3)
    chain = torchattacks_pgd_step if norm == "linf" else torchattacks_pgdl2_step
    n = x_adv.shape[0]
    alpha_t = torch.full((n,), alpha, device=device())
    eps_t = torch.full((n,), eps, device=device())
    expected, ours = x_adv, x_adv.clone()
    for _ in range(3):
        expected = chain(expected, x_nat, grad, alpha, eps)
        triton_op()(ours, x_nat, grad, alpha_t, eps_t, 0.0, 1.0, norm, None, 0)
        assert_verbose_equal(ours, expected)
        grad = torch.randn_like(grad)


@pytest.mark.parametrize("norm", [None, 2, "l1"])
def test_functional_refuses_a_norm_as_the_other_backends(norm):
    """test_pgd_step.py's test_functional_refuses_a_norm_alike_on_every_backend on the Triton backend: a norm that is
    not a string got the schema's "robust_ops::pgd_step_triton() Expected a value of type 'str' for argument 'norm'"."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    before = x_adv.clone()
    with pytest.raises(RuntimeError) as err:
        robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm=norm, backend="triton")
    assert str(err.value) == f"pgd_step_: expected norm to be 'linf' or 'l2', got {norm!r}"
    assert torch.equal(x_adv, before)


def test_vmap_is_refused_by_name_as_on_the_other_backends():
    """test_pgd_step.py's test_vmap_is_refused_by_name_on_every_backend on the Triton backend (it raised "Batching
    rule not implemented for robust_ops::pgd_step_triton")."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    before = x_adv.clone()
    with pytest.raises(RuntimeError, match=r"^pgd_step_: expected grad outside torch\.func\.vmap, got a tensor"):
        torch.func.vmap(lambda g: robust_ops.pgd_step_(x_adv, x_nat, g, alpha, eps, backend="triton"))(
            torch.stack([grad, -grad]))
    assert torch.equal(x_adv, before)


def test_argument_errors_match_fake_checks():
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    cases = [
        dict(norm="l1"),
        dict(clip_min=1.0, clip_max=0.0),
        dict(alpha=alpha[:1]),
        dict(grad=grad.double()),
        dict(history=torch.zeros((2, 2, 3, 4), device=device()), slot=2),
        # The C++ device checks (a meta tensor stands in for another device) and overlap checks.
        dict(x_nat=x_nat.to("meta")),
        dict(grad=grad.to("meta")),
        dict(alpha=alpha.to("meta")),
        dict(eps=eps.to("meta")),
        dict(history=torch.zeros((2, 2, 3, 4), device="meta")),
        dict(x_adv=x_adv[:1].expand(2, 3, 4)),
        dict(history=torch.zeros((1, 2, 3, 4), device=device()).expand(2, 2, 3, 4)),
    ]
    for changes in cases:
        args = dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps, clip_min=0.0, clip_max=1.0,
                    norm="linf", history=None, slot=0)
        args.update(changes)
        with pytest.raises(RuntimeError) as expected:
            check_pgd_step_args(**args)
        with pytest.raises(RuntimeError) as got:
            triton_op()(*args.values())
        assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("name", ["x_nat", "grad", "alpha", "eps", "history"])
def test_device_mismatch_names_the_argument(name):
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    args = dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps, clip_min=0.0, clip_max=1.0, norm="linf",
                history=torch.zeros((2, 2, 3, 4), device=device()), slot=0)
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=rf"pgd_step_: expected {name} on the device of x_adv \({x_adv.device}\), "
                       "got meta"):
        triton_op()(*args.values())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("overlapping", ["x_adv", "history"])
def test_internal_overlap_rejected_before_any_write(norm, overlapping):
    """As the C++ op (docs/ops/pgd_step.md: a rejected call leaves x_adv untouched): the launcher used to write
    history[slot] and fail only when copying back into an expanded x_adv."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 4), device=device())
    history = torch.zeros((2, 3, 4), device=device())
    cpu_x_adv, cpu_history = x_adv.cpu(), history.cpu()  # expanded below: .cpu() of an expanded CUDA tensor is dense
    if overlapping == "x_adv":
        x_adv, cpu_x_adv = x_adv[:1].expand(3, 4), cpu_x_adv[:1].expand(3, 4)
    else:
        history, cpu_history = history[:1].expand(2, 3, 4), cpu_history[:1].expand(2, 3, 4)
    base, hist_before = x_adv.clone(), history.clone()
    with pytest.raises(RuntimeError, match=f"pgd_step_: expected {overlapping} without internal overlap") as got:
        triton_op()(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 0)
    assert torch.equal(x_adv, base) and torch.equal(history, hist_before)
    with pytest.raises(RuntimeError) as native:
        torch.ops.robust_ops.pgd_step_(cpu_x_adv, x_nat.cpu(), grad.cpu(), alpha.cpu(), eps.cpu(), 0.0, 1.0, norm,
                                       cpu_history, 0)
    assert str(got.value) == str(native.value)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shared", ["x_adv", "history"])
def test_per_sample_values_sharing_written_memory(norm, shared):
    check_per_sample_values_sharing_written_memory(triton_op(), norm, shared, device())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shared", ["x_nat", "grad", "history"])
def test_partial_overlap_with_what_is_written(norm, shared):
    """x_nat / grad / history[slot] sharing memory with what the kernel writes, one sample apart, as the C++ op handles
    it (it copies): programs of the launcher used to read x_nat or grad values that other programs had already
    overwritten with their step (or with their history slot)."""
    buf = torch.rand((4, 6), dtype=torch.float64, device=device()) * 2 - 1
    x_adv, other = buf[1:], buf[:-1]
    _, x_nat, grad, alpha, eps = make_inputs((3, 6), torch.float64, device(), scale=0.3)
    history = None
    if shared == "x_nat":
        x_nat = other
    elif shared == "grad":
        grad = other
    else:  # history[0] is x_nat shifted by one sample
        hist_buf = torch.rand((4, 6), dtype=torch.float64, device=device())
        x_nat, history = hist_buf[:3], hist_buf[1:].unsqueeze(0)
    expected_buf = buf.clone()
    exp_x_nat = expected_buf[:-1] if shared == "x_nat" else x_nat.clone()
    exp_grad = expected_buf[:-1] if shared == "grad" else grad
    exp_history = None if history is None else history.clone()
    reference.pgd_step_(expected_buf[1:], exp_x_nat, exp_grad, alpha, eps, -1.0, 1.0, norm, exp_history, 0)
    triton_op()(x_adv, x_nat, grad, alpha, eps, -1.0, 1.0, norm, history, 0)
    assert_verbose_equal(buf, expected_buf, "x_adv")
    if history is not None:
        assert_verbose_equal(history, exp_history, "history")


@pytest.mark.parametrize("norm", NORMS)
def test_history_slot_partly_overlapping_x_adv_is_rejected_before_any_write(norm):
    """As the C++ op: the launcher wrote x_adv, then failed copying into a history slot that shares part of it."""
    buf = torch.rand((4, 6), device=device())
    _, x_nat, grad, alpha, eps = make_inputs((3, 6), device=device())
    before = buf.clone()
    with pytest.raises(RuntimeError, match=r"pgd_step_: expected history\[0\] to be x_adv itself or apart from it, "
                                           r"got a slot that partly overlaps x_adv") as got:
        triton_op()(buf[1:], x_nat, grad, alpha, eps, 0.0, 1.0, norm, buf[:3].unsqueeze(0), 0)
    assert torch.equal(buf, before)
    cpu = buf.cpu()
    with pytest.raises(RuntimeError) as native:
        torch.ops.robust_ops.pgd_step_(cpu[1:], x_nat.cpu(), grad.cpu(), alpha.cpu(), eps.cpu(), 0.0, 1.0, norm,
                                       cpu[:3].unsqueeze(0), 0)
    assert str(got.value) == str(native.value)


@pytest.mark.parametrize("norm", NORMS)
def test_history_slot_interleaved_with_x_adv_holds_the_step(norm):
    """A strided slot sharing every other element with x_adv (not dense: ATen's overlap test cannot judge the pair, so
    it is not refused): x_adv is written, then the slot, as in the reference. The launcher copied the slot from x_adv
    itself, reading elements of x_adv that the copy had already overwritten, so slot elements took the values of
    other positions (found by the ops fuzzer)."""
    buf = torch.rand(32, dtype=torch.float64, device=device())
    _, x_nat, grad, alpha, eps = make_inputs((1, 16), torch.float64, device(), scale=0.3)
    expected_buf = buf.clone()
    reference.pgd_step_(expected_buf[2:18].view(1, 16), x_nat, grad, alpha, eps, 0.0, 1.0, norm,
                        expected_buf[0:32:2].view(1, 1, 16), 0)
    triton_op()(buf[2:18].view(1, 16), x_nat, grad, alpha, eps, 0.0, 1.0, norm, buf[0:32:2].view(1, 1, 16), 0)
    assert_verbose_equal(buf, expected_buf, "buffer")


@pytest.mark.parametrize("norm", NORMS)
def test_signed_zero_and_nan_pass_the_clamps_as_torch_clamp(norm):
    """torch.clamp returns its input on a tie (-0.0 clamped to max=0.0 stays -0.0) and propagates NaN; eps = 0 with
    a step that does not move (L2: 1/||delta|| = inf) gives factor 0, never NaN."""
    x_nat = torch.full((3, 4), -0.0, device=device())
    x_adv = torch.full((3, 4), -0.5, device=device())
    x_adv[1, 0] = float("nan")
    x_adv[2] = x_nat[2]
    grad = torch.zeros((3, 4), device=device())
    grad[1] = 1.0
    alpha = torch.full((3,), 0.25, device=device())
    eps = torch.tensor([0.0, 0.1, 0.0], device=device())
    (ours, _), (ref, _) = run_both(x_adv, x_nat, grad, alpha, eps, (-1.0, 0.0), norm)
    assert_verbose_equal(ours, ref)
    assert torch.equal(torch.signbit(ours), torch.signbit(ref))
    assert bool(torch.signbit(ours[0]).all()) and bool(torch.isnan(ours[1, 0]))
    assert not bool(torch.isnan(ours[2]).any())


def test_linf_eps_zero_keeps_the_sign_where_triton_negates_as_zero_minus(monkeypatch):
    """Triton 3.6 (torch 2.11's, on the GPU machines) computes -x as 0 - x, +0.0 for x = +0.0: the kernel's -eps
    bound lost torch's -0.0 there (the test above failed). Simulated under the interpreter on the pinned triton,
    whose -x is fneg; not on CUDA, where the patched semantics would land in triton's kernel cache."""
    if device() == "cuda":
        pytest.skip("patches triton's semantics: interpreter only")
    from triton.language.semantic import TritonSemantic

    def zero_minus(self, input):  # triton 3.6's TritonSemantic.minus
        zero = self.tensor(self.builder.get_null_value(input.type.scalar.to_ir(self.builder)), input.type.scalar)
        return self.sub(zero, input, True)

    monkeypatch.setattr(TritonSemantic, "minus", zero_minus)
    test_signed_zero_and_nan_pass_the_clamps_as_torch_clamp("linf")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty(shape):
    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, device=device())
    history = torch.zeros((2,) + shape, device=device())
    for norm in NORMS:
        triton_op()(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1)
    assert x_adv.shape == shape


def test_grid_limit_is_cudas_on_programs_per_sample_block():
    """CUDA's 1-D grid takes at most 2**31 - 1 programs; a program takes BLOCK elements of one sample, so one-element
    samples reach it at 2**31 samples (x_adv of 4 GiB in float16) and 1025-element ones at 2**30. Triton's launcher
    parses the grid as C ints: past the limit it raised "OverflowError: signed integer is greater than maximum",
    naming neither op nor argument. Worked out on the helper: no tensor of that size is allocated."""
    from robust_ops.triton._utils import MAX_PROGRAMS, per_sample_grid

    assert MAX_PROGRAMS == 2**31 - 1
    assert per_sample_grid("pgd_step_triton", "x_adv", 2**31 - 1, 1, 1024) == (1, (2**31 - 1,))
    assert per_sample_grid("pgd_step_triton", "x_adv", 2**30 - 1, 1025, 1024) == (2, (2**31 - 2,))
    for n, per_sample, programs in ((2**31, 1, 2**31), (2**30, 1025, 2**31), (3, 2**41, 3 * 2**31)):
        with pytest.raises(RuntimeError, match=re.escape(
            f"pgd_step_triton: expected at most 2147483647 programs (CUDA's limit on a 1-D grid) of 1024 elements of "
            f"one sample each, got {programs} for x_adv of {n} samples of {per_sample} elements; split the batch",
        )):
            per_sample_grid("pgd_step_triton", "x_adv", n, per_sample, 1024)


@pytest.mark.parametrize("norm", NORMS)
def test_grid_past_the_limit_is_refused_before_any_write(monkeypatch, norm):
    """The launcher computes its grid through the checked helper, before it writes x_adv or the history slot (the
    limit lowered: 3 samples of 2200 elements take 3 programs each)."""
    import robust_ops.triton._utils as triton_utils

    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 1100), device=device(), seed=1)
    history = torch.full((2, 3, 2, 1100), -7.0, device=device())
    before, history_before = x_adv.clone(), history.clone()
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 8)
    with pytest.raises(RuntimeError, match=re.escape(
        "pgd_step_triton: expected at most 8 programs (CUDA's limit on a 1-D grid) of 1024 elements of one sample "
        "each, got 9 for x_adv of 3 samples of 2200 elements; split the batch",
    )):
        triton_op()(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1)
    assert_verbose_equal(x_adv, before, "x_adv")
    assert_verbose_equal(history, history_before, "history")
    monkeypatch.setattr(triton_utils, "MAX_PROGRAMS", 9)
    (ours, h_ours), (ref, h_ref) = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, slot=1)
    assert_verbose_equal(ours, ref, "x_adv")
    assert_verbose_equal(h_ours, h_ref, "history")


def test_may_overlap_compares_element_spans():
    """As at::get_overlap_status(a, b) != No: views of one storage whose element spans intersect (interleaved views
    count), not adjacent or empty ones, nor other storages."""
    from robust_ops.triton._utils import may_overlap

    buf = torch.arange(12.0, device=device())
    rows = buf.view(3, 4)
    # Each pair both ways round: a bound off by one on one side only (a_first <= b_last) made the adjacent pair
    # overlap when the later view came first, a needless copy every step (found by the mutation pass).
    for a, b, expected in [
        (buf[0:3], buf[2:5], True),  # one shared element
        (buf[0:3], buf[3:6], False),  # adjacent
        (rows[0:1], rows[1:2], False),
        (rows[:, 0], rows[:, 1], True),  # interleaved
        (buf[:0], buf, False),
        (buf, buf[5:5], False),
        (buf[:6], torch.arange(12.0, device=device())[6:], False),
    ]:
        assert may_overlap(a, b) == may_overlap(b, a) == expected, (a, b)


def test_launches_run_under_the_tensors_cuda_device():
    """Triton launches on the current CUDA device: the launchers enter the tensor's device first (no-op on CPU)."""
    import contextlib
    from types import SimpleNamespace

    from robust_ops.triton._utils import on_device_of

    guard = on_device_of(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))  # not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device_of(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.is_available(), reason="data-dependent checks run at once only on CPU tensors")
def test_data_dependent_checks_on_cpu():
    """The C++ CPU kernel's messages, which name the sample and value (the launcher's used to stop at "sample")."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    bad_eps = torch.tensor([0.1, -0.5])
    big_alpha = torch.tensor([0.1, 1e39], dtype=torch.float64)  # inf once converted to float32, as the kernel uses it
    for a, e, message in [(alpha, bad_eps, "expected eps >= 0 for every sample, got eps[1]=-0.5"),
                          (alpha / 0, eps, "expected alpha to be finite for every sample, got alpha[0]=inf"),
                          (big_alpha, eps, "expected alpha to be finite for every sample, got alpha[1]=inf")]:
        before = x_adv.clone()
        with pytest.raises(RuntimeError) as got:
            triton_op()(x_adv, x_nat, grad, a, e, 0.0, 1.0, "linf", None, 0)
        with pytest.raises(RuntimeError) as native:
            torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, a, e, 0.0, 1.0, "linf", None, 0)
        assert str(got.value) == str(native.value) == "pgd_step_: " + message
        assert torch.equal(x_adv, before)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm", NORMS)
def test_launcher_builds_no_tensor_from_host_data(norm):
    # torch.tensor([clip_min, clip_max], device=cuda) (aten.lift_fresh, then a host-to-device copy) waits for the
    # stream: a host sync every PGD step on a GPU. Recorded inside the launcher (the op itself is one opaque call),
    # which runs as the op's eager kernel runs it: with wrap_triton off, so a real GPU launches the kernels directly
    # (with it on, as by default outside the op, they would go through a higher-order op the mode has no rule for).
    from torch._library.triton import set_wrap_triton_enabled

    from robust_ops.triton.pgd_step import pgd_step_triton

    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4), device=device())
    history = torch.zeros((2,) + tuple(x_adv.shape), device=device())
    expected, expected_history = run_both(x_adv, x_nat, grad, alpha, eps, (0.0, 1.0), norm, history, 1)[1]
    with set_wrap_triton_enabled(False), _RecordOps() as record:
        pgd_step_triton._init_fn(x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1)
    assert "aten.lift_fresh.default" not in record.ops
    assert_verbose_equal(x_adv, expected)
    assert_verbose_equal(history, expected_history)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("norm", NORMS)
def test_step_does_not_synchronize_on_cuda(backend, norm):
    # The attacks call pgd_step_ every step; on CUDA neither backend may wait for the GPU (value checks are skipped
    # there for that reason). torch raises on a synchronizing call in sync debug mode "error".
    import robust_ops

    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 8, 8), device="cuda")
    history = torch.zeros((2,) + tuple(x_adv.shape), device="cuda")
    robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm=norm, history=history, slot=1, backend=backend)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, norm=norm, history=history, slot=1, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("with_history", [False, True])
def test_opcheck_and_compile_on_cuda(with_history):
    x_adv, x_nat, grad, alpha, eps = make_inputs((3, 2, 8, 8), device="cuda")
    history = torch.zeros((2,) + tuple(x_adv.shape), device="cuda") if with_history else None
    for norm in NORMS:
        torch.library.opcheck(triton_op(), (x_adv, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1))

    def step(x, x_nat, grad, alpha, eps, history):
        torch.ops.robust_ops.pgd_step_triton(x, x_nat, grad, alpha, eps, 0.0, 1.0, "linf", history, 0)
        return x

    eager = step(x_adv.clone(), x_nat, grad, alpha, eps, None if history is None else history.clone())
    compiled = torch.compile(step, fullgraph=True)(x_adv.clone(), x_nat, grad, alpha, eps, history)
    assert_verbose_equal(compiled, eager)


def test_functional_backend_triton():
    import robust_ops

    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4, 4), device=device())
    ours, ref = x_adv.clone(), x_adv.clone()
    robust_ops.pgd_step_(ours, x_nat, grad, 0.01, eps, norm="l2", backend="triton")
    robust_ops.pgd_step_(ref, x_nat, grad, 0.01, eps, norm="l2", backend="reference")
    assert_verbose_equal(ours, ref)


@pytest.mark.parametrize("argument", PGD_TENSOR_ARGUMENTS)
def test_refuses_an_argument_requiring_grad_under_grad_mode(argument):
    check_refuses_argument_requiring_grad(triton_op(), "pgd_step_triton", argument, device())


def test_refuses_a_non_leaf_x_adv():
    check_refuses_a_non_leaf_x_adv(triton_op(), "pgd_step_triton", device())


def test_runs_without_grad_mode_and_bumps_versions():
    check_runs_without_grad_mode_and_bumps_versions(triton_op(), device())


def test_backward_sees_the_mutation():
    check_backward_sees_the_mutation(triton_op(), device())


@pytest.mark.parametrize("name", PGD_TENSOR_ARGUMENTS)
def test_arguments_that_are_not_strided_are_refused_by_name(name):
    """A sparse (or mkldnn) argument of the direct op met torch's "Cannot access storage of SparseTensorImpl" or
    "unsupported memory format option Contiguous", or a sparse x_adv the overlap check's "expected x_adv without
    internal overlap"; refused in one line naming the op and argument, before anything is written."""
    x_adv, x_nat, grad, alpha, eps = make_inputs((2, 3, 4, 4), device=device())
    values = dict(x_adv=x_adv, x_nat=x_nat, grad=grad, alpha=alpha, eps=eps,
                  history=torch.zeros((2, 2, 3, 4, 4), device=device()))
    before = {key: t.clone() for key, t in values.items()}
    layouts = [("sparse_coo", values[name].to_sparse())]
    if values[name].dim() == 4:  # mkldnn tensors are CPU float32 only; checked before the device
        layouts.append(("_mkldnn", values[name].cpu().to_mkldnn()))
    for layout_name, t in layouts:
        args = dict(values, **{name: t})
        with pytest.raises(RuntimeError, match=re.escape(
            f"pgd_step_triton: expected {name} to be a strided (dense) tensor, got torch.{layout_name}; there is no "
            "Triton kernel for it: convert with .to_dense()"
        )):
            triton_op()(args["x_adv"], args["x_nat"], args["grad"], args["alpha"], args["eps"], 0.0, 1.0, "linf",
                        args["history"], 1)
        for key in ("x_adv", "history"):
            assert_verbose_equal(values[key], before[key], key)
