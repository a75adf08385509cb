"""Build robust_ops._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and a toolkit is present.

Environment switches:
  ROBUST_OPS_CPU_ONLY=1   skip the CUDA kernels even when they could be built
  FORCE_CUDA=1            build the CUDA kernels (fails with an explanation when no toolkit is found)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "9.0" when unset: without a GPU torch cannot detect one)
  NVCC_FLAGS              extra nvcc flags
  DEBUG=1                 -O0 -g
Install for development with `pip install --no-build-isolation -e .` (build isolation would fetch another torch).
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """The toolkit to use. torch's auto-detection picks /usr/local when nvcc is not on PATH, so prefer
    $CUDA_HOME, then /usr/local/cuda, and only then torch's guess."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", cpp_extension.CUDA_HOME):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _build_config():
    """Decide CUDA from torch.version.cuda and the toolkit -- never torch.cuda.is_available(), which is False on
    GPU-less build machines even when the kernels could be compiled."""
    if _flag("ROBUST_OPS_CPU_ONLY"):
        return False, None, "ROBUST_OPS_CPU_ONLY=1"
    cuda_home = _cuda_home()
    if _flag("FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("robust_ops: FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)")
        return True, cuda_home, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, None, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, None, f"no CUDA toolkit found (CUDA_HOME unset, no nvcc); torch.version.cuda={torch.version.cuda}"
    return True, cuda_home, f"torch.version.cuda={torch.version.cuda} and toolkit at {cuda_home}"


def _extension():
    build_cuda, cuda_home, why = _build_config()
    debug = _flag("DEBUG")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: kernels must round exactly like the eager PyTorch expressions they replace (bitwise parity
    # with torchattacks), so no fused multiply-add contraction. -fopenmp in compile AND link flags, or
    # at::parallel_for silently runs on one thread.
    cxx = ["-O0" if debug else "-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    if debug:
        cxx.append("-g")
    extra = {"cxx": cxx}
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = {}
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        # Without a GPU torch cannot detect an architecture and the build crashes; default to Hopper.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        nvcc = ["-O0" if debug else "-O3", "-std=c++20", "--fmad=false", "-lineinfo"]
        nvcc += os.environ.get("NVCC_FLAGS", "").split()
        extra["nvcc"] = nvcc
        # The pip CUDA wheels keep headers such as cusparse.h in site-packages/nvidia/cu13/include.
        for site in sys.path:
            for sub in ("cu13", "cu12"):
                inc = os.path.join(site, "nvidia", sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(
        f"robust_ops: building {'CPU + CUDA' if build_cuda else 'CPU-only'} ({why}). "
        + (
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, {len(sources)} sources."
            if build_cuda
            else "CUDA kernels disabled; Triton kernels still work where triton runs. "
            "Set FORCE_CUDA=1 with a CUDA toolkit to build them."
        ),
        flush=True,
    )
    return ext_cls(
        "robust_ops._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)},
)
