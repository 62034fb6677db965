"""The int4 GEMM on the tensor cores (``kernels.gemmq``) serves a device only after agreeing with the torch product
there (``dispatch.gemmq_sound``): the probe's logic on the CPU with the compiled op replaced by stand-ins — the
torch product, one off everywhere, one off only where K is split (a wrong reduction of the partials), one off
only for bf16, one off only where N is not a multiple of 8, one that raises — and the launch rule's bounds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_chat.models.formats import i4, i8
from rwkv_chat.models.kernels import dispatch, gemmq


def _stand_in(off: str | None):
    def run(x, q, splits=None, warps=4, relu2=False):
        if off == "raises":
            raise RuntimeError("no kernel image is available for execution on the device")
        bad = (off == "all" or (off == "splits" and (splits or 1) > 1) or (off == "bf16" and x.dtype == torch.bfloat16)
               or (off == "tail" and q.shape[1] % 8) or (off == "few" and x.shape[0] < gemmq.MIN_ROWS))
        if relu2 and off != "relu2":            # "relu2": a kernel that ignores it
            x = torch.relu(x).square()
        return i4.mm4_torch(x, q) * (1.05 if bad else 1.0)
    return run


@pytest.mark.parametrize("off, why", [(None, None), ("all", "gemmq_i4 differs"), ("splits", "2 splits"),
                                      ("bf16", "torch.bfloat16"), ("tail", "N 77"), ("raises", "RuntimeError"),
                                      ("relu2", "relu(x)²"), ("few", "3 rows")])
def test_the_probe_admits_only_a_kernel_that_agrees_with_torch(monkeypatch, off, why):
    monkeypatch.setattr(gemmq, "built", lambda: True)
    monkeypatch.setattr(gemmq, "ENABLED", True)
    monkeypatch.setattr(gemmq, "gemmq_i4_ok", lambda q: True)
    monkeypatch.setattr(gemmq, "gemmq_i4", _stand_in(off))
    dev = torch.device("cpu")
    try:
        assert dispatch.gemmq_sound(dev) is (why is None)
        got = dispatch.GEMMQ_PROBES[dev]
        assert got is None if why is None else why in got, got
        monkeypatch.setattr(gemmq, "gemmq_i4", None)            # decided once per device: no second probe
        assert dispatch.gemmq_sound(dev) is (why is None)
    finally:
        dispatch.GEMMQ_PROBES.clear()


def _stand_in_u8(off: str | None):
    def run(x, q, splits=None, warps=4, k_groups=None, relu2=False):
        if relu2 and off != "relu2":
            x = torch.relu(x).square()
        bad = off == "all" or (off == "splits" and (splits or 1) > 1) or (off == "tail" and q.shape[1] % 8)
        return i8.mm8_torch(x, q) * (1.05 if bad else 1.0)
    return run


@pytest.mark.parametrize("off, why", [(None, None), ("all", "gemmq_u8 differs"), ("splits", "2 splits"),
                                      ("tail", "N 77"), ("relu2", "relu(x)²")])
def test_the_uint8_probe_admits_only_a_kernel_that_agrees_with_torch(monkeypatch, off, why):
    monkeypatch.setattr(gemmq, "built", lambda: True)
    monkeypatch.setattr(gemmq, "gemmq_u8_ok", lambda q, x: True)
    monkeypatch.setattr(gemmq, "gemmq_u8", _stand_in_u8(off))
    dev = torch.device("cpu")
    try:
        assert dispatch.gemmq_u8_sound(dev) is (why is None)
        got = dispatch.GEMMQ_U8_PROBES[dev]
        assert got is None if why is None else why in got, got
    finally:
        dispatch.GEMMQ_U8_PROBES.clear()


def test_the_uint8_form_serves_cuda_fp16_only_and_mm8_keeps_its_paths_elsewhere():
    assert gemmq.U8_ENABLED is True
    q = i8.quantize_i8(torch.randn(256, 40) * 0.05, torch.float16)
    x = torch.randn(9, 256, dtype=torch.float16)
    assert not dispatch.gemmq_u8_serves(x, q) and not gemmq.gemmq_u8_ok(q, x)     # CPU, input-major
    torch.testing.assert_close(dispatch.mm8(x.float(), q), i8.mm8_torch(x.float(), q))


def test_without_the_op_the_probe_says_so_and_mm4_keeps_its_paths():
    dev = torch.device("cpu")
    try:
        assert not dispatch.gemmq_sound(dev)
        assert dispatch.GEMMQ_PROBES[dev] == "not built"
    finally:
        dispatch.GEMMQ_PROBES.clear()
    q = i4.quantize_i4(torch.randn(256, 40) * 0.05, 128)
    x = torch.randn(9, 256)
    assert not dispatch.gemmq_serves(x, q)
    assert not gemmq.gemmq_i4_ok(q)                              # a CPU weight in the GPTQ layout
    torch.testing.assert_close(dispatch.mm4(x, q), i4.mm4_torch(x, q))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(5, 256), k_units=st.integers(1, 160), n=st.integers(1, 70000), sms=st.integers(1, 160),
       warps=st.sampled_from([4, 8]), resident=st.integers(0, 6), k_groups=st.sampled_from([1, 2, 4]),
       stack=st.integers(1, 3))
def test_the_split_rule_keeps_to_one_wave_of_its_blocks_a_multiprocessor(rows, k_units, n, sms, warps, resident,
                                                                          k_groups, stack):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemmq, "_sms", lambda device: sms)
        mp.setattr(gemmq, "blocks_per_sm", lambda device, dtype, r, w, kg=1, u8=False: resident)
        w, splits = gemmq.gemmq_tiles(rows, k_units * gemmq.UNIT, n, "cuda", warps, torch.float16, k_groups, stack)
    tile = 16 if rows <= 16 else 32 if rows <= 32 else 64
    blocks = stack * -(-n // (32 * warps)) * -(-rows // tile)
    wave = gemmq.WAVE_MANY_ROWS if rows > 64 else gemmq.WAVE[tile]
    resident = min(max(resident, 1), max(1, wave // k_groups))   # a block's groups count as blocks
    assert w == warps and 1 <= splits <= k_units
    if splits > 1:
        assert blocks * splits <= resident * sms                       # no second wave
    assert splits == k_units or blocks * (splits + 1) > resident * sms  # and no fewer splits than that allows


def test_k_groups_follow_the_rows_and_fall_back_where_the_device_lacks_the_shared_memory(monkeypatch):
    fits = {1: 2, 2: 1, 4: 1}
    monkeypatch.setattr(gemmq, "blocks_per_sm", lambda device, dtype, r, w, kg=1, u8=False: fits[kg])
    for rows in (5, 16, 17, 32, 33, 64, 65, 200):
        assert gemmq.k_groups_for(rows, "cuda") == (gemmq.K_GROUPS if rows in gemmq.K_GROUPS_ROWS else 1)
        assert gemmq.k_groups_for(rows, "cuda", warps=8) == 1
    fits[2] = fits[4] = 0                                               # e.g. 100 KiB of shared memory a block
    assert {gemmq.k_groups_for(r, "cuda") for r in (5, 33, 64, 200)} == {1}


def test_without_the_op_two_blocks_a_multiprocessor_are_assumed():
    assert not gemmq.built()
    assert gemmq.blocks_per_sm("cuda", torch.float16, 64, 4) == 2


def _assert_views(views, parts, names):
    """views: one [G, ...] tensor per name, whose g-th slice equals that tensor of parts[g]."""
    assert views is not None
    for name, v in zip(names, views, strict=True):
        assert v.shape == (len(parts), *getattr(parts[0], name).shape) and v.is_contiguous()
        for k, q in enumerate(parts):
            assert torch.equal(v[k], getattr(q, name))


def test_a_stack_of_int4_weights_is_viewed_as_one_tensor_per_part(monkeypatch):
    monkeypatch.setattr(gemmq, "gemmq_i4_ok", lambda q: True)
    g = torch.Generator().manual_seed(0)
    parts = [i4.quantize_i4(torch.randn(256, 64, generator=g) * 0.05, 128).with_layout(True) for _ in range(3)]
    stacked = i4.stack_i4(parts)
    _assert_views(gemmq.stack_tensors(stacked), parts, ("storage", "qzeros", "scales"))
    assert gemmq.stack_tensors(parts) is None                          # three separate allocations: no stack
    assert gemmq.stack_tensors(stacked[:1]) is None
    assert gemmq.stack_tensors([stacked[0], stacked[2]]) is None       # not back to back


def test_a_stack_of_i8_weights_is_viewed_as_one_tensor_per_part(monkeypatch):
    monkeypatch.setattr(gemmq, "u8_weight_ok", lambda q: True)         # the layout checks of a CUDA weight
    g = torch.Generator().manual_seed(0)
    parts = [i8.quantize_i8(torch.randn(256, 64, generator=g) * 0.05, torch.float16, output_major=True)
             for _ in range(3)]
    stacked = i8.stack_i8(parts)
    for a, b in zip(stacked, parts):
        assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)) and a.output_major
    _assert_views(gemmq.stack_u8_tensors(stacked), parts, ("storage", "mx", "rx", "my", "ry"))
    assert gemmq.stack_u8_tensors(parts) is None                       # three separate allocations: no stack
    assert gemmq.stack_u8_tensors(stacked[:1]) is None
    assert gemmq.stack_u8_tensors([stacked[0], stacked[2]]) is None    # not back to back
    assert i8.stack_i8([parts[0], i8.quantize_i8(torch.randn(256, 32), torch.float16, output_major=True)]) is None
    x = torch.randn(3, 8, 256, dtype=torch.float16)
    assert dispatch.mm8_stack(x, stacked) is None                      # CPU: the per-matrix products serve


def test_three_or_four_rows_go_to_it_for_large_weights_only():
    big, small = (4096, 16384), (4096, 4096)
    assert gemmq.FEW_ROWS == range(3, gemmq.MIN_ROWS) and big[0] * big[1] >= gemmq.FEW_ROWS_WEIGHTS
    assert [r for r in range(1, 8) if gemmq.serves(r, *big)] == [3, 4, 5, 6, 7]
    assert [r for r in range(1, 8) if gemmq.serves(r, *small)] == [5, 6, 7]
    assert all(gemmq.serves(r, *small) == gemmq.serves_rows(r) for r in range(5, 300))


def test_rows_go_to_it_from_five_up_but_any_band_the_triton_kernel_keeps():
    assert [r for r in range(1, 300) if gemmq.serves_rows(r)] == \
        [r for r in range(gemmq.MIN_ROWS, 300) if r not in gemmq.TRITON_ROWS]
    assert not gemmq.serves_rows(4) and gemmq.serves_rows(5) and gemmq.serves_rows(32) and gemmq.serves_rows(65)
