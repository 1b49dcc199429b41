"""Build of iwae_ext._C: CPU kernels always, CUDA kernels when asked for or found.

Environment switches (read at build time):
  IWAE_EXT_CUDA          "auto" (default): build the CUDA kernels when torch is a CUDA build
                         and nvcc is found; "1": build them or fail; "0": CPU only.
  TORCH_CUDA_ARCH_LIST   CUDA architectures; default: the visible GPUs' (e.g. "9.0+PTX"), or
                         "9.0+PTX" with no GPU visible
                         (H100/H200 machine code, plus PTX that newer GPUs compile at load).
                         With a GPU visible, torch picks that GPU's arch.
  MAX_JOBS               parallel compile jobs (ninja).
  IWAE_EXT_DEBUG=1       -O0 -g, for gdb (otherwise the shared object carries no debug info).
Install with `pip install --no-build-isolation -e .` so that the extension is compiled
against the torch that will import it; the package's metadata then requires exactly that
torch release (an extension built against one torch does not load in another).
"""
import glob
import os
import re
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError:  # pip's build isolation: a fresh environment without torch
    sys.exit("iwae_ext compiles against the torch it will run with: install torch first, then build "
             "without build isolation: pip install --no-build-isolation .")

SUPPORTED_TORCH = ((2, 11), (2, 15))  # >= 2.11, < 2.15: the range CI builds and tests

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_requested() -> bool:
    mode = os.environ.get("IWAE_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"setup.py: IWAE_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    usable = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not usable:
        sys.exit(
            "setup.py: IWAE_EXT_CUDA=1 but "
            + ("torch is a CPU-only build" if torch.version.cuda is None
               else "nvcc was not found (set CUDA_HOME, e.g. /usr/local/cuda)")
        )
    return mode == "1" or (mode == "auto" and usable)


def _extension():
    with_cuda = _cuda_requested()
    debug = os.environ.get("IWAE_EXT_DEBUG") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # torch adds the -std= its headers need; -fno-math-errno lets loops with sqrt vectorise;
    # -fno-trapping-math lets GCC compute both sides of a select (nothing here reads the
    # floating-point exception flags; no value changes): without it the kernels' branch-free
    # selects stay branches for AVX2 and the SSE baseline (not vectorised) and masked
    # operations for AVX-512. -g0 overrides the -g of Python's CFLAGS (nvcc adds no host
    # debug info unless asked, and rejects -g0)
    cxx = opt + ([] if debug else ["-g0"]) + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    arch_list = ""
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # the visible GPUs' architectures (PTX of the newest for later ones), else Hopper's;
            # set explicitly so that what is built is what build_info() reports
            caps = sorted({torch.cuda.get_device_capability(d) for d in range(torch.cuda.device_count())}
                          if torch.cuda.is_available() else {(9, 0)})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # CUDA wheels of torch ship the cuBLAS/cuSPARSE headers that ATen/cuda needs here.
        for site in sys.path:
            for sub in ("cu13", "cu12"):
                inc = os.path.join(site, "nvidia", sub, "include")
                if os.path.isdir(inc) and inc not in include_dirs:
                    include_dirs.append(inc)
    cxx.append(f'-DIWAE_EXT_CUDA_ARCH_LIST="{arch_list}"')
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return ext_cls(
        name="iwae_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"] + ([] if debug else ["-s"]),  # -s: no symbol tables or debug info
    )


def _torch_requirement() -> str:
    """``torch==X.Y.Z``: the release this build's binary loads with (any local build of it, +cpu or
    +cu130, satisfies it), as torch-scatter's wheels pin theirs."""
    release = re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)
    major_minor = tuple(int(v) for v in release.split(".")[:2])
    if not SUPPORTED_TORCH[0] <= major_minor < SUPPORTED_TORCH[1]:
        print(f"setup.py: warning: torch {torch.__version__} is outside the tested range "
              f">= {'.'.join(map(str, SUPPORTED_TORCH[0]))}, < {'.'.join(map(str, SUPPORTED_TORCH[1]))}",
              file=sys.stderr)
    return f"torch=={release}"


setup(
    install_requires=[_torch_requirement(), "numpy", "tqdm"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
