"""``doctor``'s weight-format section: which compiled product serves each format on each device type, the torch
path (and why) where the family is not built, and f8 refused on a GPU below compute capability 8.9."""

from __future__ import annotations

from rwkv_chat.daemon.doctor import F8_CAPABILITY, format_status


def test_formats_follow_the_kernel_report_and_the_gpu_capability():
    kernels = {"cpu": {"mm8": "ok", "gemvq": "ok"},
               "cuda": {"mm8": "ok", "gemvq": "build failed: nvcc not found"}}
    out = format_status(kernels, {"cuda:0": (8, 0), "cuda:1": F8_CAPABILITY})
    assert set(out) == {"cpu", "cuda:0", "cuda:1"}
    assert all(out["cpu"][f].startswith("compiled (") for f in ("i8", "i4", "f8"))
    assert "mm8" in out["cpu"]["i8"] and "gemvq" in out["cpu"]["i4"] and "emulated" in out["cpu"]["f8"]
    assert out["cuda:0"]["f8"].startswith("cannot run: f8 needs compute capability 8.9+ (this GPU: 8.0)")
    assert out["cuda:1"]["f8"].startswith("torch, each product dequantizing its matrix (gemvq build failed;")
    assert out["cuda:0"]["i4"] == out["cuda:1"]["i4"] and out["cuda:1"]["i4"].startswith("torch")


def test_formats_without_a_kernel_report():
    out = format_status({"cpu": {"all": "engine not importable: no module"}}, {})
    assert list(out) == ["cpu"]
    assert all(v.startswith("torch, each product dequantizing its matrix") for v in out["cpu"].values())
