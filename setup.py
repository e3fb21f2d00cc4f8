"""Build of mtlfast._C: the C++ CPU kernels always, the CUDA kernels when nvcc is found.

Switches: MTLFAST_NO_EXT=1 builds no extension (pure-torch package);
MTLFAST_NO_CUDA=1 skips the CUDA kernels; MTLFAST_CUDA_ARCHS="90" (space or semicolon
separated) builds the CUDA kernels for those architectures only (default: 80 and 90).
Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed.

CUDA kernels are plain .cu files against cuda_runtime.h with C launchers. nvcc compiles
each of them to an object for sm_80 and sm_90. When the installed torch has CUDA, the
objects and csrc/cuda/cuda_ops.cpp (the dispatcher registrations) are linked into the
extension with the static CUDA runtime; with a CPU-only torch the nvcc step is a compile
check and the extension is CPU-only.
"""

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = tuple(os.environ.get("MTLFAST_CUDA_ARCHS", "80 90").replace(";", " ").split())
# torch's arch-flag helper raises IndexError on a CPU build with no GPU and no list set.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def _find_nvcc():
    if os.environ.get("MTLFAST_NO_CUDA") == "1":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_objects(nvcc, build_dir):
    """Compile every csrc/cuda/*.cu to an object, in parallel; a failure fails the build."""
    os.makedirs(build_dir, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    cmds = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        obj = os.path.join(build_dir, os.path.basename(src)[:-3] + ".o")
        cmds.append((obj, [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler",
                           "-fPIC", "-lineinfo", *gencode]))
    for _, cmd in cmds:
        print(" ".join(cmd), flush=True)
    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda c: subprocess.run(c[1], check=True), cmds))
    return [obj for obj, _ in cmds]


def _cuda_lib_dir(nvcc):
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(home, sub, "libcudart_static.a")):
            return os.path.join(home, sub)
    return os.path.join(home, "lib64")


def _extensions():
    if os.environ.get("MTLFAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp: ATen's parallel_for is an inline OpenMP region, compiled into our objects.
    # Linking libgomp.so.1 resolves to the copy torch already loaded (same soname).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    extra_objects, libraries, library_dirs, link_args = [], [], [], ["-fopenmp"]
    nvcc = _find_nvcc()
    if nvcc:
        objects = _nvcc_objects(nvcc, os.path.join(ROOT, "build", "cuda_objects"))
        if torch.version.cuda is not None:
            sources.append("csrc/cuda/cuda_ops.cpp")
            cxx.append("-DMTLFAST_WITH_CUDA")
            extra_objects = objects
            libraries = ["cudart_static", "dl", "rt", "pthread"]
            library_dirs = [_cuda_lib_dir(nvcc)]
        else:
            print("mtlfast: torch has no CUDA; the CUDA kernels were a compile check only")
    ext = CppExtension(
        "mtlfast._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_objects=extra_objects,
        libraries=libraries,
        library_dirs=library_dirs,
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
