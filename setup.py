"""Build kw_ops and, where a C++ compiler works, its compiled kernels kw_ops._C (csrc/).

kw_ops._C holds the CPU kernel of the KW op (csrc/kw_conv.cpp, csrc/cpu/); there are no CUDA sources yet.
If the extension cannot be built (no compiler, a compile error, torch not importable) the package still
installs and runs on the pure-PyTorch path; the reason is written to kw_ops/_C_build.txt, which
`python -m kw_ops info` prints.

Environment: KW_OPS_NO_EXT=1 skips the extension (set at run time, kw_ops does not load a built one);
MAX_JOBS bounds ninja's parallel jobs (torch's BuildExtension reads it). Build with `pip install -e . --no-build-isolation` (build isolation would
download another torch).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

BUILD_NOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kw_ops", "_C_build.txt")


def _note(text):
    print(f"kw_ops: {text}")
    with open(BUILD_NOTE, "w") as f:
        f.write(text + "\n")


def extensions():
    if os.environ.get("KW_OPS_NO_EXT") == "1":
        _note("kw_ops._C not built: KW_OPS_NO_EXT=1 was set at install")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        _note(f"kw_ops._C not built: torch not importable at build time ({error})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds kw_ops._C; a failure leaves the package installable on the pure-PyTorch path."""

        def run(self):
            try:
                super().run()  # compiles, then (editable installs) copies the library into kw_ops/
            except Exception as error:  # no compiler, compile or link error: report and install without it
                _note(f"kw_ops._C not built: compiling failed ({type(error).__name__}: {error}); "
                      "the pure-PyTorch backend is used")
            else:
                _note("kw_ops._C built")

        def get_outputs(self):  # nothing to install when the build failed
            return [path for path in super().get_outputs() if os.path.exists(path)]

    print(f"kw_ops: building kw_ops._C from {sources}")
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragmas are ignored without it (the kernel
    # then runs on one thread); libgomp.so.1 resolves to the copy torch has already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext = CppExtension("kw_ops._C", sources, extra_compile_args=["-O3", "-g0", *openmp], extra_link_args=openmp,
                       py_limited_api=False)
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="kw_ops",
    version="0.1.0",
    description="KernelWarehouse dynamic convolution for PyTorch: layers, presets, fused ops, benchmarks",
    packages=find_packages(include=["kw_ops", "kw_ops.*"]),
    package_data={"kw_ops": ["_C_build.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "tqdm"],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
