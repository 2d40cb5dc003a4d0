"""Build entry point for speed-kernels.

The compiled extension ``speed_kernels._C`` (sources in csrc/) is built with
``torch.utils.cpp_extension`` and ninja against the torch that is importable at build time, so
install with::

    pip install --no-build-isolation .        # or -e . ; torch must be installed first

(a build-isolated ``pip install .`` would not see torch and installs the package without the
extension). What gets built:

* the CPU kernels (``backend="cpp"``) on any machine with a C++17 compiler;
* plus the CUDA kernels (``backend="cuda"``) when torch is a CUDA build and a CUDA toolkit (nvcc)
  is found; archs ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``: A100, H100/H200).

Environment variables:

* ``SPEED_KERNELS_NO_EXT=1``: skip the extension entirely (pure-Python install: triton/torch backends).
* ``SPEED_KERNELS_CUDA=0`` / ``=1``: force the CUDA kernels off / on (on: fails to build if
  there is no CUDA torch or toolkit, and then the install goes on without the extension).
* ``MAX_JOBS``: parallel compile jobs (ninja).

A failed build fails the install, with the reason and the way out in the message pip shows:
pip hides a successful build's output, so a warning would go unseen and the user would land on the
slower fallback without knowing. ``SPEED_KERNELS_NO_EXT=1`` installs the pure-Python package on
purpose; ``speed_kernels.backends()`` then says which backends run and why the others do not.
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _banner(msg: str) -> str:
    bar = "=" * 78
    return f"\n{bar}\nspeed-kernels: {msg}\n{bar}\n"


def _warn(msg: str) -> None:
    print(_banner(msg), file=sys.stderr)


NO_EXT_HINT = (
    "To install without the compiled kernels on purpose (backends 'torch-fast'/'torch' on the CPU, "
    "'triton' on GPUs), set SPEED_KERNELS_NO_EXT=1."
)


def _fail(msg: str) -> None:
    raise SystemExit(_banner(f"{msg}\n{NO_EXT_HINT}"))


def _extension_config():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) when it is skipped."""
    if os.environ.get("SPEED_KERNELS_NO_EXT", "0") == "1":
        _warn("SPEED_KERNELS_NO_EXT=1: building without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation, or torch missing
        _fail(
            f"torch is not importable at build time ({exc}), so speed_kernels._C cannot be built. "
            "Install torch first (pip install -r requirements.txt), then install this package with "
            "`pip install --no-build-isolation .` (or -e .) so the build sees it."
        )

    want = os.environ.get("SPEED_KERNELS_CUDA", "auto")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want == "0":
        use_cuda = False
    elif want == "1":
        use_cuda = True
        if not cuda_possible:
            _warn(
                f"SPEED_KERNELS_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r}: the CUDA build will fail"
            )
    else:
        use_cuda = cuda_possible

    csrc = "csrc"  # relative paths: setuptools wants them
    sources = [f"{csrc}/bindings.cpp", f"{csrc}/registration.cpp", f"{csrc}/cpu_ops.cpp", f"{csrc}/flow_cpu.cpp"]
    cxx = ["-O3", "-fno-math-errno", "-fopenmp"]
    extra = {"cxx": cxx}
    define_macros = []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += [f"{csrc}/cuda_ops.cu", f"{csrc}/cuda_glue.cpp"]
        define_macros.append(("SPEED_KERNELS_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="speed_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, csrc)],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension that turns a failed build into a warning: the package still installs."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile error, toolkit mismatch
                _fail(
                    f"building speed_kernels._C failed ({type(exc).__name__}: {exc}). It needs a C++17 "
                    "compiler with OpenMP (Debian/Ubuntu: apt-get install g++), and nvcc matching torch's "
                    "CUDA for the CUDA kernels (SPEED_KERNELS_CUDA=0 builds the CPU kernels only)."
                )

    print(f"speed-kernels: building speed_kernels._C ({'CPU + CUDA' if use_cuda else 'CPU only'})", file=sys.stderr)
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_config()

setup(
    name="speed-kernels",
    version="0.1.0",
    description="SpeeD time-step sampling and weighting for diffusion training, on fused kernels",
    packages=find_packages(include=["speed_kernels", "speed_kernels.*"])
    + find_packages("python", include=["speed_train", "speed_train.*"]),
    package_dir={"speed_train": "python/speed_train"},
    python_requires=">=3.10",
    # every module the package imports at run time (scikit-learn and pillow: the embedded digits and
    # the sample grids of the default `speed-kernels train`)
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib", "pillow", "scikit-learn"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["speed-kernels=speed_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
