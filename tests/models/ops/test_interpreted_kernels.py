"""The Triton kernels in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by each script before it
imports Triton, hence a separate process per script): the quantized GEMVs and fused LayerNorm + int4 q/k/v
(``tests/gpu/interpret_quant_kernels.py``), the decode ops ``rope_store`` / ``decode_attention``
(``interpret_decode_kernels.py``), the norm + GEMV of a decode step's projections (``interpret_prenorm.py``)
a tiny Qwen2 / Qwen3 through the Triton ops against the torch ops
(``interpret_qwen2_model.py``) the chunked RWKV-5/6 WKV (``interpret_wkv5_chunk.py``) and the chunked RWKV-7 WKV on the tensor cores
(``interpret_wkv7_chunk.py``). Each script compares against torch references and exits non-zero on a mismatch;
the CUDA code generation is checked without a GPU by compiling every kernel for sm_90 with Triton's own compiler
(``tests/gpu/compile_triton.py``) and on a GPU by ``tests/gpu/verify_*.py``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[2] / "gpu"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CPU torch wheel)")
@pytest.mark.parametrize("script", ["interpret_quant_kernels.py", "interpret_decode_kernels.py",
                                    "interpret_prenorm.py", "interpret_qwen2_model.py",
                                    "interpret_wkv5_chunk.py", "interpret_wkv7_chunk.py"])
def test_kernels_in_the_triton_interpreter_match_the_torch_references(script):
    out = subprocess.run([sys.executable, str(GPU / script)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CPU torch wheel)")
def test_every_triton_kernel_compiles_for_hopper_without_a_gpu():
    """``tests/gpu/compile_triton.py``: each op's launches lowered to a cubin for sm_90 by Triton's own compiler."""
    out = subprocess.run([sys.executable, str(GPU / "compile_triton.py"), "--quick"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " 0 cases failed" in out.stdout and "rope_attention_kernel" in out.stdout and "norm_gemv_kernel" in out.stdout
