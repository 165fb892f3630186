"""Build kw_ops. The CUDA extension kw_ops._C (csrc/) is built only where a CUDA torch and nvcc exist.

Environment: KW_OPS_NO_CUDA=1 skips the extension; MAX_JOBS bounds ninja's parallel jobs. No GPU
needs to be visible at build time: a CUDA build of torch and nvcc are enough.
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("KW_OPS_NO_CUDA") == "1":
        print("kw_ops: KW_OPS_NO_CUDA=1, not building the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("kw_ops: torch not importable at build time, not building the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("kw_ops: no CUDA torch or nvcc, not building the CUDA extension (pure PyTorch and Triton still work)")
        return [], {}
    print(f"kw_ops: building kw_ops._C from {sources}")
    ext = CUDAExtension("kw_ops._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="kw_ops",
    version="0.1.0",
    description="KernelWarehouse dynamic convolution for PyTorch: layers, presets, fused ops, benchmarks",
    packages=find_packages(include=["kw_ops", "kw_ops.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "tqdm"],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
