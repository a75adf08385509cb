"""Build robust_ops._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and a toolkit is present.

Environment switches:
  ROBUST_OPS_CPU_ONLY=1   skip the CUDA kernels even when they could be built
  FORCE_CUDA=1            build the CUDA kernels (fails with an explanation when no toolkit is found)
                          A CUDA build (forced or not) fails with an explanation when the toolkit's CUDA major.minor
                          differs from torch.version.cuda: robust_ops would refuse to load such kernels.
  TORCH_CUDA_ARCH_LIST    GPU architectures; unset, empty or "native": those of the GPUs this machine sees, as torch
                          detects them; when it sees none, unset or empty builds "9.0" (Hopper only: torch could
                          detect nothing) and "native" stops the build with an explanation
  NVCC_FLAGS              extra nvcc flags
  DEBUG=1                 -O0 -g (C++ and nvcc's host code)
Install for development with `pip install --no-build-isolation -e .` (build isolation would fetch another torch).
A build whose compiler or LDFLAGS link libstdc++ statically is refused (see _check_cxx_runtime; CXX/CC choose others).
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import setuptools
from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# pyproject.toml's SPDX `license` string needs setuptools 77 (its table form is deprecated); with
# --no-build-isolation pip does not enforce build-system.requires, so an older one would fail on that field's schema.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"robust_ops: building needs setuptools>=77 (found {setuptools.__version__}): pip install -U setuptools")


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        # FORCE_CUDA=y read as off would build without CUDA and only say so in the build log
        sys.exit(f"robust_ops: {name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")
    return value in ("1", "true", "yes", "on")


def _cuda_home():
    """The toolkit to use. torch's auto-detection picks /usr/local when nvcc is not on PATH, so prefer
    $CUDA_HOME, then $CUDA_PATH, then /usr/local/cuda, and only then torch's guess."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(name)
        if value and not os.path.exists(os.path.join(value, "bin", "nvcc")):
            # Said aloud: otherwise another toolkit is used (or blamed in a version error) without a word.
            print(f"robust_ops: ignoring {name}={value} (no bin/nvcc there)", file=sys.stderr, flush=True)
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", cpp_extension.CUDA_HOME)
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None when it cannot be run or read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_toolkit(cuda_home):
    """Refuse a CUDA build whose kernels robust_ops would refuse to load (robust_ops/_extension.py compares the CUDA
    major.minor of the kernels with torch.version.cuda); torch itself only errors on a major mismatch."""
    if torch.version.cuda is None:
        sys.exit(f"robust_ops: FORCE_CUDA=1 but torch {torch.__version__} is a CPU build (torch.version.cuda is None); "
                 "install a CUDA build of torch, or unset FORCE_CUDA")
    toolkit = _nvcc_version(cuda_home)
    wanted = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    if toolkit is None:
        # Not fatal (a broken nvcc fails the build anyway), but the mismatch check is skipped, so say so.
        print(f"robust_ops: could not read the CUDA version of {cuda_home}/bin/nvcc; not compared with torch's "
              f"CUDA {torch.version.cuda}", file=sys.stderr, flush=True)
    elif toolkit != wanted:
        sys.exit(f"robust_ops: the CUDA toolkit at {cuda_home} is CUDA {toolkit[0]}.{toolkit[1]} but torch "
                 f"{torch.__version__} was built with CUDA {torch.version.cuda}; the CUDA kernels must be compiled "
                 f"with the same CUDA version. Set CUDA_HOME to a CUDA {wanted[0]}.{wanted[1]} toolkit, or build "
                 "without the CUDA kernels: ROBUST_OPS_CPU_ONLY=1")


def _build_config():
    """Decide CUDA from torch.version.cuda and the toolkit -- never torch.cuda.is_available(), which is False on
    GPU-less build machines even when the kernels could be compiled."""
    if _flag("ROBUST_OPS_CPU_ONLY"):
        return False, None, "ROBUST_OPS_CPU_ONLY=1"
    cuda_home = _cuda_home()
    if _flag("FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("robust_ops: FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)")
        _check_toolkit(cuda_home)
        return True, cuda_home, f"FORCE_CUDA=1, toolkit at {cuda_home}"
    if torch.version.cuda is None:
        return False, None, f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, None, f"no CUDA toolkit found (CUDA_HOME unset, no nvcc); torch.version.cuda={torch.version.cuda}"
    _check_toolkit(cuda_home)
    return True, cuda_home, f"torch.version.cuda={torch.version.cuda} and toolkit at {cuda_home}"


def _cuda_arch_list():
    """Settle TORCH_CUDA_ARCH_LIST for a CUDA build; returns what the build message says of it. Unset, empty or
    "native": torch builds for the GPUs it sees (+PTX for the newest), so a Hopper-only default there would fail on
    this machine's own A100 or L4 ("no kernel image is available"); without a visible GPU torch detects nothing and
    crashes, so that build is for Hopper."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = chosen  # torch reads " 9.0" as the architectures "" and "9.0"
    if chosen and chosen != "native":
        return f"TORCH_CUDA_ARCH_LIST={chosen}"
    gpus = torch.cuda.device_count()
    if gpus:
        found = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(gpus)})
        return f"TORCH_CUDA_ARCH_LIST={chosen or 'unset'}: the visible GPUs' {';'.join(found)}"
    if chosen:
        sys.exit("robust_ops: TORCH_CUDA_ARCH_LIST=native but this machine sees no GPU; name the architectures "
                 "instead, e.g. TORCH_CUDA_ARCH_LIST='8.0;8.9;9.0'")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    return ("TORCH_CUDA_ARCH_LIST=9.0 (the default without a visible GPU: Hopper only; "
            "for other GPUs set it, e.g. '8.0;8.9;9.0')")


def _extension():
    build_cuda, cuda_home, why = _build_config()
    debug = _flag("DEBUG")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # Headers and the CUDA sources whichever build this is: they trigger rebuilds, and setuptools puts ext.depends
    # in the sdist (without them a wheel built from the sdist, as `python -m build` does, would not compile).
    depends = sorted(
        path
        for pattern in ("*.h", "*.cuh", "*.cu")
        for path in glob.glob(os.path.join("csrc", "**", pattern), recursive=True)
    )
    # -ffp-contract=off: kernels must round exactly like the eager PyTorch expressions they replace (bitwise parity
    # with torchattacks), so no fused multiply-add contraction. -fopenmp in compile AND link flags, or
    # at::parallel_for silently runs on one thread.
    cxx = ["-O0" if debug else "-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    if debug:
        cxx.append("-g")
    extra = {"cxx": cxx}
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        arch_list = _cuda_arch_list()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        # -g: host-side debug info as the C++ files get; not -G (device debug changes the kernels' code and speed)
        nvcc = ["-O0" if debug else "-O3", "-std=c++20", "--fmad=false", "-lineinfo"] + (["-g"] if debug else [])
        nvcc += os.environ.get("NVCC_FLAGS", "").split()
        extra["nvcc"] = nvcc
        # The pip CUDA wheels keep headers such as cusparse.h in site-packages/nvidia/cu13/include. Only torch's
        # CUDA major (the toolkit's, see _check_toolkit): another major's headers would not match its libraries.
        sub = "cu" + torch.version.cuda.split(".")[0]
        for site in sys.path:
            inc = os.path.join(site, "nvidia", sub, "include")
            if os.path.isdir(inc) and inc not in include_dirs:
                include_dirs.append(inc)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(
        f"robust_ops: building {'CPU + CUDA' if build_cuda else 'CPU-only'} ({why}). "
        + (
            f"{arch_list}, {len(sources)} sources."
            if build_cuda
            else "CUDA kernels disabled; Triton kernels still work where triton runs. "
            "Set FORCE_CUDA=1 with a CUDA toolkit to build them."
        ),
        flush=True,
    )
    return ext_cls(
        "robust_ops._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


def _needed_libraries(path):
    """The shared libraries an ELF file names (DT_NEEDED), read with binutils' readelf (installed beside the linker);
    None where that cannot be read (no readelf, not an ELF file)."""
    try:
        out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)


def _check_cxx_runtime(built, compiler):
    """Refuse an extension that carries its own copy of libstdc++ while torch loads the shared one. Some compilers
    link libstdc++ statically (a GPU machine's image had such a GCC, 2026-12-04); the two runtimes then mix their
    locale data, and the first error message that formats a number crashes the process with a segmentation fault."""
    torch_libs = _needed_libraries(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ours = _needed_libraries(built)
    if not torch_libs or ours is None:
        return  # cannot tell: no readelf, or not ELF
    shared_libstdcxx = [any(name.startswith("libstdc++") for name in needed) for needed in (torch_libs, ours)]
    if shared_libstdcxx == [True, False]:
        os.remove(built)  # else the next build would find it up to date and use it
        flags = os.environ.get("LDFLAGS", "").strip()
        sys.exit(
            f"robust_ops: {os.path.basename(built)} was linked with its own static libstdc++ (linker {compiler}"
            + (f", LDFLAGS={flags}" if flags else "")
            + "), while torch loads the shared libstdc++.so.6: two C++ runtimes in one process crash on the first "
            "error message that formats a number. Build with a compiler and flags that link it dynamically "
            "(e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc, no -static-libstdc++)"
        )


def _source_digest():
    """robust_ops/_source_digest.py's digest of csrc/, the file loaded by path: importing robust_ops would load _C."""
    spec = importlib.util.spec_from_file_location("_robust_ops_source_digest",
                                                  os.path.join(ROOT, "robust_ops", "_source_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(os.path.join(ROOT, "csrc"))


def _write_source_digest(build_temp):
    """Write source_digest.h (csrc/robust_ops.cpp bakes it into _C as _C.SOURCE_DIGEST) into a folder of the build;
    returns the folder, and whether the digest changed. Rewritten only when it changed, so only robust_ops.cpp
    recompiles for it."""
    folder = os.path.abspath(os.path.join(build_temp, "robust_ops_digest"))
    header = os.path.join(folder, "source_digest.h")
    text = f'#define ROBUST_OPS_SOURCE_DIGEST "{_source_digest()}"\n'
    try:
        with open(header) as f:
            if f.read() == text:
                return folder, False
    except OSError:
        pass
    os.makedirs(folder, exist_ok=True)
    with open(header, "w") as f:
        f.write(text)
    return folder, True


class _BuildExtension(cpp_extension.BuildExtension):
    def build_extension(self, ext):
        folder, changed = _write_source_digest(self.build_temp)
        if folder not in ext.include_dirs:
            ext.include_dirs.append(folder)
        if changed:
            # setuptools skips a build none of whose files is newer than _C: a csrc/ file deleted by a pull left the
            # old _C, and its old digest, in place however often one rebuilt
            self.force = True
        super().build_extension(ext)
        if sys.platform.startswith("linux"):  # ELF and libstdc++; MSVC's compiler object has no compiler_cxx
            # a C++ extension is linked by the C++ compiler (distutils swaps it in for linker_so's first word)
            _check_cxx_runtime(self.get_ext_fullpath(ext.name), self.compiler.compiler_cxx[0])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(no_python_abi_suffix=True)},
)
