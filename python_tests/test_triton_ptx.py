"""The Triton kernels' floating-point instructions, checked without a GPU by compiling them for sm_90.

Bitwise parity with the eager expressions needs correctly rounded products and quotients that are never contracted:
torch.compile launches the kernels itself and drops enable_fp_fusion=False (seen on an H200, torch 2.11), and
float32 "/" lowers to the approximate div.full.f32. The interpreted runs of the other Triton tests cannot see either,
so this compiles the real kernels (in a subprocess: TRITON_INTERPRET=1 decides at import time) and reads the PTX.
Likewise the width of their index arithmetic, read from the TTIR: an int32 overflow shows only at 2**31 elements.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from robust_ops.triton import boundary_search_step, pgd_step

    def ptx(fn, signature, constexprs):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    def report(name, dtype, text):
        arithmetic = r"\\b(fma\\.[a-z0-9.]+|div\\.[a-z0-9.]+f(?:32|64)|mul\\.[a-z0-9.]*f(?:32|64))"
        ops = sorted(set(re.findall(arithmetic, text)))
        print(name, dtype, " ".join(ops))

    for dtype in ("fp32", "fp64"):
        ptr = "*" + dtype
        report("boundary_search_step", dtype, ptx(boundary_search_step._boundary_search_step_kernel, {
            "lo_ptr": ptr, "hi_ptr": ptr, "points_ptr": ptr, "crossed_ptr": "*i64", "active_ptr": "*i64",
            "per_sample": "i64", "total": "i64", "k": "i32", "blocks_per_sample": "i64",
            "HAS_ACTIVE": "constexpr", "BLOCK": "constexpr"}, {"HAS_ACTIVE": False, "BLOCK": 1024}))
        report("pgd_l2_delta", dtype, ptx(pgd_step._l2_delta_kernel, {
            "x_ptr": ptr, "x_nat_ptr": ptr, "grad_ptr": ptr, "alpha_ptr": ptr, "grad_norm_ptr": ptr,
            "delta_ptr": ptr, "per_sample": "i64", "blocks_per_sample": "i64", "BLOCK": "constexpr"},
            {"BLOCK": 1024}))
        report("pgd_l2_project", dtype, ptx(pgd_step._l2_project_kernel, {
            "x_ptr": ptr, "x_nat_ptr": ptr, "delta_ptr": ptr, "factor_ptr": ptr, "bounds_ptr": ptr,
            "hist_ptr": ptr, "per_sample": "i64", "blocks_per_sample": "i64", "hist_offset": "i64",
            "HAS_HISTORY": "constexpr", "BLOCK": "constexpr"}, {"HAS_HISTORY": True, "BLOCK": 1024}))
""")


def _compile_for_sm90(script):
    """The output of ``script`` run compiling the kernels for sm_90 in a fresh interpreter (TRITON_INTERPRET unset:
    compiled, not interpreted); a skip where triton cannot compile for it here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr.lower() and "not found" in done.stderr.lower():
        pytest.skip(f"triton cannot compile for sm_90 here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def float_ops():
    """{(kernel, dtype): set of the floating-point fma/div/mul instructions in its sm_90 PTX}."""
    out = _compile_for_sm90(COMPILE)
    found = {}
    for line in out.splitlines():
        name, dtype, *ops = line.split()
        found[(name, dtype)] = set(ops)
    assert len(found) == 6, out
    return found


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("kernel", ["boundary_search_step", "pgd_l2_delta", "pgd_l2_project"])
def test_no_contracted_or_approximate_float_math(float_ops, kernel, dtype):
    ops = float_ops[(kernel, dtype)]
    assert not [op for op in ops if op.startswith("fma.")], f"{kernel} {dtype}: FMA in the PTX: {sorted(ops)}"
    assert not [op for op in ops if op.startswith("div.") and ".rn." not in op], (
        f"{kernel} {dtype}: division not correctly rounded: {sorted(ops)}")
    assert [op for op in ops if op.startswith("mul.rn.")], f"{kernel} {dtype}: products not via mul_rn: {sorted(ops)}"
    # torch (and the C++ kernels) keep subnormals; libdevice's __nv_fmul_rn, under triton's default
    # enable_reflect_ftz, is mul.rn.ftz.f32, which makes subnormal factors and products sign-preserving zeros
    assert not [op for op in ops if ".ftz" in op], f"{kernel} {dtype}: subnormals flushed to zero: {sorted(ops)}"


INDEX_WIDTH = textwrap.dedent("""
    import re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from robust_ops.triton import boundary_search_step, drop_max_pool2d, pgd_step

    POINTERS = {"idx_ptr": "*i64", "crossed_ptr": "*i64", "active_ptr": "*i1"}
    CONSTEXPRS = {"KH": 3, "KW": 3, "ACC": tl.float32, "HAS_ACTIVE": True, "HAS_HISTORY": True}
    for module, name in ((drop_max_pool2d, "_drop_max_pool2d_fwd_kernel"),
                         (drop_max_pool2d, "_drop_max_pool2d_bwd_kernel"),
                         (boundary_search_step, "_boundary_search_step_kernel"), (pgd_step, "_linf_kernel"),
                         (pgd_step, "_l2_delta_kernel"), (pgd_step, "_l2_project_kernel")):
        fn = getattr(module, name)
        constexprs = {arg: CONSTEXPRS.get(arg, module.BLOCK) for arg in fn.arg_names if arg.isupper()}
        # every integer argument 32-bit, as triton types a size or stride below 2**31
        signature = {arg: "constexpr" if arg in constexprs else POINTERS.get(arg, "*fp32" if arg.endswith("_ptr")
                     else "i32") for arg in fn.arg_names}
        ttir = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32)).asm["ttir"]
        # index arithmetic: a product, or a sum over a block, in 32 bits (k - 1 and j + 1 of the search are scalars)
        narrow = re.findall(r"arith\\.muli [^\\n]*: i32 |arith\\.(?:muli|addi|subi) [^\\n]*xi32> ", ttir)
        print(name, len(narrow))
""")


@pytest.fixture(scope="module")
def index_width():
    """{kernel: its 32-bit index products and block sums} in its TTIR, every integer argument typed i32."""
    out = _compile_for_sm90(INDEX_WIDTH)
    found = {name: int(count) for name, count in map(str.split, out.splitlines())}
    assert len(found) == 6, out
    return found


@pytest.mark.parametrize("kernel", ["_drop_max_pool2d_fwd_kernel", "_drop_max_pool2d_bwd_kernel",
                                    "_boundary_search_step_kernel", "_linf_kernel", "_l2_delta_kernel",
                                    "_l2_project_kernel"])
def test_index_arithmetic_is_64_bit(index_width, kernel):
    """Offsets from program_id * BLOCK, n * per_sample or n * stride in int32 wrap for tensors of 2**31 elements and
    more, which no CPU test can allocate (the interpreter's results at small sizes are the same either way): each
    kernel widens its program id to int64 first, so no index product or block offset is 32-bit, even when triton
    types every size and stride as i32 (below 2**31 it does). A 32-bit argument added to a pointer as it is stays
    (the pointer arithmetic sign-extends it)."""
    assert index_width[kernel] == 0, f"{kernel}: {index_width[kernel]} index products or block offsets in 32 bits"


def test_a_short_compile_output_fails_showing_it(monkeypatch):
    # the fixtures' assertion message is the compile script's output: float_ops named a variable gone since its
    # subprocess moved into _compile_for_sm90, so a short output was a NameError that hid what the script printed
    for fixture, line in ((float_ops, "boundary_search_step fp32 mul.rn.f32"), (index_width, "_linf_kernel 0")):
        monkeypatch.setattr(sys.modules[__name__], "_compile_for_sm90", lambda script, line=line: line + "\n")
        with pytest.raises(AssertionError, match=line):
            fixture.__wrapped__()
