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

A failed build never fails the install: a warning is printed and the package imports without
``_C``; ``speed_kernels.backends.backends()`` then reports why ``cpp``/``cuda`` are unavailable.
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nspeed-kernels: {msg}\n{bar}\n", file=sys.stderr)


def _extension_config():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) when it is skipped."""
    if os.environ.get("SPEED_KERNELS_NO_EXT", "0") == "1":
        _warn("SPEED_KERNELS_NO_EXT=1: building without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation, or torch missing
        _warn(
            f"torch is not importable at build time ({exc}); installing without the compiled "
            "extension. Use `pip install --no-build-isolation .` after installing torch."
        )
        return [], {}

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
                _warn(
                    f"building speed_kernels._C failed ({type(exc).__name__}: {exc}); installing "
                    "without it (backends 'cpp'/'cuda' unavailable, 'torch'/'triton' still work)"
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
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "scipy", "scikit-learn"],
    },
    entry_points={"console_scripts": ["speed-kernels=speed_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
