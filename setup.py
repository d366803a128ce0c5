"""Build and install fused_bnlstm.

The compiled extension ``fused_bnlstm._C`` is built from the C++ sources in ``csrc/`` with torch's
``BuildExtension`` (pybind11 through ``torch/extension.h``, ninja when installed). Torch must already be
installed, so install with ``pip install --no-build-isolation .`` (an isolated build would pull an
unpinned, multi-GB torch). ``FUSED_BNLSTM_BUILD_EXTENSION=0`` skips the extension; the package then runs on
its reference and Triton backends and says so when the ``"cpp"`` backend is asked for.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    """The ``fused_bnlstm._C`` extension: every ``csrc/*.cpp``, plus ``csrc/*.cu`` where CUDA can build.

    Without CUDA sources, or without a CUDA toolchain (a CPU torch, or no nvcc), it is a C++ extension and
    needs nothing from CUDA, so the same set-up works on CPU machines and on GPU machines with no network.
    With CUDA sources and nvcc it is a CUDA extension compiled with ``-DFUSED_BNLSTM_WITH_CUDA``; C++ code
    that calls CUDA launchers guards them with that macro.
    """
    if os.environ.get("FUSED_BNLSTM_BUILD_EXTENSION", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources and not cuda_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    common = dict(name="fused_bnlstm._C", include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"])
    if cuda_sources and torch.version.cuda is not None and CUDA_HOME is not None:
        extension = CUDAExtension(
            sources=cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_BNLSTM_WITH_CUDA"],
                                "nvcc": ["-O3", "-DFUSED_BNLSTM_WITH_CUDA"]},
            **common,
        )
    else:
        extension = CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [extension], {"build_ext": BuildExtension}


def _require_torch():
    """The extension compiles against the installed torch; say how to install when it is missing."""
    if os.environ.get("FUSED_BNLSTM_BUILD_EXTENSION", "1") == "0":
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "fused_bnlstm's C++ extension builds against the installed torch, and none was found. Install torch "
            "first (on CPU machines: pip install torch==2.13.0), then pip install --no-build-isolation -e . "
            "(an isolated build cannot see that torch); or set FUSED_BNLSTM_BUILD_EXTENSION=0."
        ) from None


_require_torch()
ext_modules, cmdclass = extension_modules()

setup(
    name="fused_bnlstm",
    version="0.1.0",
    description="Batch-normalized LSTM (Cooijmans et al., ICLR 2017) for PyTorch: fused Triton and C++ kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_bnlstm", "fused_bnlstm.*"]),
    package_data={"fused_bnlstm": ["ops/README.md"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.3"],
    extras_require={"triton": ["triton>=3.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
