"""Build entry point for speed-kernels (the compiled extension is added in csrc/)."""
from setuptools import setup, find_packages

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
)
