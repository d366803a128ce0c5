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
    if os.environ.get("FUSED_BNLSTM_BUILD_EXTENSION", "1") == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]}
    extension = CppExtension(
        name="fused_bnlstm._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension}


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
