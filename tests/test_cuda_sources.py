"""Every CUDA source the kernel build compiles (``models.kernels.CUDA_SOURCES``, the ``.cu`` files) compiles for the
GPU generations the kernels serve (sm_80 and sm_90) with NVIDIA's compiler from its PyPI wheels (the ``test`` extra),
so a device-code error (an instruction an architecture lacks, a bad inline PTX operand) fails here on a machine
without a GPU, not in a user's first build. The op bindings' C++ (``csrc/bindings``: schemas, argument types, calls
into the launchers) is checked too, with the host compiler, torch's headers and stand-ins for the four CUDA-library
types torch's CUDA headers name (``tests/cuda_stubs``); it is built and run on a GPU (``tests/gpu``)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rwkv_chat.models import kernels

ARCHES = ("80", "90")


def _nvcc() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        nvcc = Path(root) / "cu13" / "bin" / "nvcc"
        if nvcc.exists():
            return nvcc
    return None


NVCC = _nvcc()


def _failures(commands: dict[str, list[str]]) -> list[str]:
    """Runs each source's compiler command, two at a time; the sources that failed, each with its compiler's
    message."""
    def run(item: tuple[str, list[str]]) -> str | None:
        rel, cmd = item
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return None if r.returncode == 0 else f"{rel}:\n{r.stderr[-3000:]}"

    with ThreadPoolExecutor(2) as pool:
        return [f for f in pool.map(run, commands.items()) if f]


@pytest.mark.skipif(NVCC is None, reason="NVIDIA's compiler wheels (nvidia-cuda-nvcc, the test extra on Linux x86_64) "
                                         "are not installed on this platform")
def test_every_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    src = kernels.default_source_dir()
    sources = [s for s in kernels.CUDA_SOURCES if s.endswith(".cu")]
    assert "gemvq/gemmq_cuda.cu" in sources and len(sources) >= 10

    failures = _failures({rel: [str(NVCC), *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHES), "-std=c++17",
                                "-O1", "-Xptxas=-O0", f"-I{NVCC.parent.parent / 'include'}", "-c", str(src / rel),
                                "-o", str(tmp_path / (rel.replace("/", "_") + ".o"))] for rel in sources})
    assert not failures, "\n\n".join(failures)


STUBS = Path(__file__).resolve().parent / "cuda_stubs"


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None,
                    reason="needs NVIDIA's compiler wheels (for the CUDA runtime headers) and g++")
def test_the_op_bindings_compile_against_torchs_headers():
    from torch.utils.cpp_extension import include_paths

    src = kernels.default_source_dir()
    bindings = [s for s in kernels.CUDA_SOURCES if s.startswith("bindings/")]
    assert "bindings/gemvq_ops.cpp" in bindings and len(bindings) >= 4
    includes = [*include_paths(), str(STUBS), str(NVCC.parent.parent / "include"), sysconfig.get_paths()["include"]]

    failures = _failures({rel: ["g++", "-std=c++17", "-fsyntax-only", *(f"-I{i}" for i in includes), str(src / rel)]
                          for rel in bindings})
    assert not failures, "\n\n".join(failures)
