from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fol-plugin",
    version="0.1.0",
    description="FoL (Focus on Local, AAAI 2025) visual place recognition as a drop-in method: "
    "checkpoint-exact model, torch.hub entrypoints, fast exact re-ranking and evaluation",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["fol_plugin", "fol_plugin.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "kornia>=0.7.2",
        "kornia-rs>=0.1.2",
        "numpy>=1.23",
        "numba>=0.59",
        "tqdm>=4.60",
        "faiss-cpu>=1.7.4",
        "scikit-learn>=1.1",
        "matplotlib>=3.5",
        "pillow>=9",
        "xxhash>=3",
        "pytorch-metric-learning>=2",
    ],
    entry_points={"console_scripts": ["fol-vpr = fol_plugin.cli:main"]},
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.17"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
