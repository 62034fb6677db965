"""The fused CUDA backend: RWKV-7 layers through the compiled kernels of ``csrc/fused`` in place of the eager block.

Same math as ``models/rwkv/v7.py`` (ChatRWKV ``RWKV_x070_TMix_*`` / ``RWKV_x070_CMix_*``, pip 0.8.32), in
a few launches per layer:

Decode (``FusedCuda.decode_step``, one token for each of b rows), per layer:
  1. ``v7_mix``: residual add + ln1 + token shift + the six lerps (r, w, k, v, a, g), att_x updated;
  2. one grouped GEMV for r, k, v and the first low-rank products (w1, a1, g1, v1) (b <= 4 rows);
  3. one grouped GEMV for the second low-rank products with tanh / sigmoid applied on the input;
  4. ``v7_tmix_one``: decay, in-context rate, kk normalization, v_first mix, the WKV-7 state step
     (state updated in place), per-head group norm, the r·k bonus and the gate;
  5. GEMV output; 6. ``v7_mix`` residual add + ln2 + shift + lerp; 7. GEMV key writing relu(k)²; 8. the value
     product: the output-major grouped GEMV (``ffn="gemv"``, what ``attach`` picks below C = ``SPARSE_FFN_MIN_C``);
     ``ffn="sparse"`` (from that width up): the compiled row
     kernel (``dispatch.ffn_rows``, ``csrc/fused/ffn_rows.cu``), which reads only the rows of the input-major value
     matrix where some row of relu(k)² is not zero (``"dense"``: the same kernel reading every row, same bits;
     benchmarks: bench/sparse_ffn.py). The residual add of 8 happens in the next layer's step 1.
  With ``fold_norms`` (probed; what ``attach`` picks for C <= ``FOLD_NORMS_MAX_C``) steps 1 and 6 run inside the
  launches of 2 and 7 (each block
  normalizes the row itself: ``dispatch.ln_mix_gemv_group``); the new att_x / ffn_x go to scratch tensors that the
  launches of 3 and 8 copy into the state, once every block that read the old ones has finished.
More than 4 rows (the mix lerps in ``MANY_ORDER``): r|k|v as one batched GEMM over a [3, C, C] stack (plain
matrices), the v|w|a low-rank stages as two batched GEMMs (``low_rank_many``), the output, channel-mix and head
products as GEMMs, all through cuBLASLt with the algorithm timed per shape at the first step (``tuned_gemm``:
``dispatch.gemm(tuned=True)`` / ``dispatch.bgemm``; the choice is kept per process, so a step's rounding can
differ between processes that timed differently, never between the rows of one step); g's two small low-rank
products by torch; the WKV step one fused launch per layer. i8 weights (<= 4 rows) use the grouped uint8
GEMV of ``csrc/gemvq`` (else ``csrc/mm8``'s): r/k/v in one launch, relu² applied on load for the channel-mix
value; i4 and f8 weights the grouped GEMV of ``csrc/gemvq`` (``dispatch.gemvq_group``) for r/k/v in one launch
and each other product (relu² of the channel-mix value's input applied as the kernel loads it);
with ``FusedCuda(mix_rkv=True)``, i4 r/k/v through ``ops.gptq.fused_v7_mix_rkv_i4`` (probed at load): steps 1 and
2's r/k/v in one Triton launch (ln1, the six mixes and the three int4 products), the low-rank products in the
grouped GEMV.

Prefill (``FusedCuda.sequence_block``, T > 1): ``v7_mix`` (the previous token's LayerNorm recomputed in the
same block), cuBLAS GEMMs over [B·T, C], ``v7_pre``, the compiled WKV-7 sequence kernel, ``v7_post``.

Weights: at load (``FusedCuda``), each CUDA float matrix of the model is stored output-major (the
checkpoint's [out, in] layout, exposed as the usual [in, out] view ``W.t()``), so a GEMV reads every output's
weights contiguously and cuBLAS reads the same memory transposed; except, with ``ffn`` "sparse" or "dense",
the fp16 / bf16 channel-mix value matrices, stored input-major ([F, C] contiguous: the row of input f is
contiguous, so rows can be skipped; cuBLAS takes either layout), and with ``quant_rows`` the i8 and f8 ones likewise
(uint8 / e4m3 rows; the row kernel takes relu(k)² of the key product's raw k as it loads it; products of more rows:
i8 through ``ops.gemv.i8_gemm``, which reads either layout, or the dequantized matrix, f8 through an output-major
copy); the backend keeps its own per-layer tensors
(the six mixes stacked, the low-rank matrices output-major). Products of the large matrices outside the GEMV
kernels and the tuned GEMMs go through the model's ops (``ops.matmul``: cuBLAS, the compiled mm8). Shapes: C channels, H heads
of N, b rows.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.backends import persistent_step as _persistent
from rwkv_chat.models.backends.base import Backend, Ops
from rwkv_chat.models.backends.persistent_step import PersistentStep
from rwkv_chat.models.errors import DeviceError, StrategyError
from rwkv_chat.models.formats.f8 import Float8Weight
from rwkv_chat.models.formats.i4 import Int4Weight, stack_i4
from rwkv_chat.models.formats.i8 import Int8Weight, stack_i8
from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.kernels import gemmq as _gemmq
from rwkv_chat.models.ops import _triton, gemv as triton_gemv, gptq as fused_gptq, sparse_ffn

GEMV_ROWS = 4           # rows served by the grouped GEMV kernel (more: cuBLAS)
_BIG = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
        "ffn.key.weight", "ffn.value.weight")
_LOW = ("att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2", "att.v1", "att.v2")
HEAD_SIZES = (8, 16, 32, 64, 128)
#: the widest model (C) whose decode steps ``attach`` builds with ln1 / ln2 inside the GEMV launches (``fold_norms``):
#: every block normalizes the row itself, which pays where launches dominate. H100, one call (bench/results/h100.md):
#: 0.1B (C = 768) 2,908 -> 3,117 tok/s greedy on the device, 1.5B (C = 2048) 669.8 -> 588.4
FOLD_NORMS_MAX_C = 768
#: the channel-mix value products of decode steps at <= GEMV_ROWS rows (``FusedCuda(ffn=...)``)
FFN_MODES = ("sparse", "dense", "gemv")
#: the narrowest model (C) whose decode steps ``attach`` builds with ``ffn="sparse"`` (the row kernel skipping the zero
#: rows of relu(k)², same bits as reading them all). H100 (bench/results/h100.md, "Sparse channel-mix value product"):
#: at the 7.2B shape (C = 4096) the product is 1.07-1.41x the grouped GEMV at 1..4 rows already with random weights
#: (25-50% rows skipped at 1-2 rows) and 2.4-5.6x with 80-90% dead rows, the whole step 1.10x at batch 1; at the 1.5B
#: shape it is 0.53-0.81x with random weights at 1..4 rows, so narrower models keep the grouped GEMV.
SPARSE_FFN_MIN_C = 4096


def _ops():
    return torch.ops.rwkv_chat


def default_ffn(n_embd: int) -> str:
    """The channel-mix value product ``attach`` picks for a model of width ``n_embd`` (C): "sparse" from
    ``SPARSE_FFN_MIN_C`` up, else "gemv" (see ``FFN_MODES``)."""
    return "sparse" if n_embd >= SPARSE_FFN_MIN_C else "gemv"


def kernels_loaded() -> bool:
    from rwkv_chat.models import kernels
    return kernels.available("cuda", "v7fused")


def _layer_ok(p: dict, x: torch.Tensor, spec) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and "ffn.s_emb.weight" not in p
            and spec.head_size in HEAD_SIZES and spec.n_embd <= 6144 and p["ln1.weight"].device == x.device)


def _output_major(w):
    """A float [in, out] matrix as the transposed view of a contiguous [out, in] one, an i8 / f8 weight on CUDA held
    output-major (same values)."""
    if isinstance(w, Int8Weight) and w.w.is_cuda:
        return w.with_layout(True)
    if isinstance(w, Float8Weight) and w.w8.is_cuda:
        return w.with_layout(False)
    if not isinstance(w, torch.Tensor) or not w.is_cuda or w.dim() != 2:
        return w
    if w.t().is_contiguous():
        return w
    return w.t().contiguous().t()


def _rows_ok(w) -> bool:
    """Whether the row kernel (``_value_rows``) gets the value matrix w [F, C] input-major: fp16 / bf16 on CUDA, or
    an i8 weight there (uint8 rows of 16-byte multiples, its scales in fp16 / bf16), or an f8 one (e4m3 rows of
    16-byte multiples, float32 scales)."""
    if isinstance(w, Int8Weight):
        return (w.w.is_cuda and w.shape[1] % 16 == 0 and w.mx.dtype in (torch.float16, torch.bfloat16)
                and all(t.dtype == w.mx.dtype for t in (w.rx, w.my, w.ry)))
    if isinstance(w, Float8Weight):
        return w.w8.is_cuda and w.shape[1] % 16 == 0 and w.scale.dtype == torch.float32
    return isinstance(w, torch.Tensor) and w.is_cuda and w.dim() == 2 and w.dtype in (torch.float16, torch.bfloat16)


def _rows_laid(w, h) -> bool:
    """Whether w is held input-major for the row kernel with activations h (``_input_major`` put it so)."""
    if isinstance(w, Int8Weight):
        return not w.output_major and _rows_ok(w) and w.mx.dtype == h.dtype
    if isinstance(w, Float8Weight):
        return w.input_major and _rows_ok(w) and h.dtype in (torch.float16, torch.bfloat16)
    return isinstance(w, torch.Tensor) and w.is_contiguous() and _rows_ok(w) and w.dtype == h.dtype


def _value_rows(h, w, skip: bool, mm, skipped: list | None = None, relu2: bool = False):
    """The channel-mix value product h [b, F] @ w on the input-major w [F, C] (a float matrix, or an input-major
    ``Int8Weight`` / ``Float8Weight``): the compiled row kernel (``dispatch.ffn_rows``: with ``skip`` the rows where h is zero in every
    row are left unread), else ``mm``. ``relu2``: h is the raw k and relu(k)² is multiplied. ``skipped``: where the
    kernel skipped rows, the share it left unread is appended (a host sync)."""
    y = dispatch.ffn_rows(h, w, skip_zeros=skip, relu2=relu2)
    if y is None:
        return mm(torch.relu(h).square() if relu2 else h, w)
    if skip and skipped is not None:
        skipped.append(sparse_ffn.zero_row_fraction(torch.relu(h).square() if relu2 else h))
    return y


def _input_major(w, atype: torch.dtype):
    """A float [in, out] CUDA matrix stored contiguous [in, out], an i8 / f8 weight held input-major (same values):
    its rows can be skipped. ``atype``: the layer's activation dtype (f8 rows serve fp16 / bf16 ones only)."""
    if isinstance(w, Int8Weight):
        return w.with_layout(False) if _rows_ok(w) else w
    if isinstance(w, Float8Weight):
        return w.with_layout(True) if _rows_ok(w) and atype in (torch.float16, torch.bfloat16) else w
    return w.contiguous() if _rows_ok(w) else _output_major(w)


#: ``_gemv`` act codes: relu², tanh, sigmoid applied to the results (rounded to the activation dtype first), none on x
RELU2_ON_OUTPUT = 3 * 4
TANH_ON_OUTPUT = 1 * 4
SIGMOID_ON_OUTPUT = 2 * 4


#: tanh(xw @ w1) and sigmoid(xg @ g1) written by the first low-rank products (rounded as the reference rounds them),
#: so the second ones load plain inputs (order w1, a1, g1, v1)
_LOW_ACTS = [TANH_ON_OUTPUT, 0, SIGMOID_ON_OUTPUT, 0]


def _gemv(xs, ws, acts, out_dtype=None, copy=None):
    """Grouped GEMV: ys[e] = out_act_e(act_e(xs[e]) @ ws[e].t()) for output-major ws[e] [M, N]; 1..4 rows.
    acts[e] = act + 4 * out_act (codes 0 none, 1 tanh, 2 sigmoid, 3 relu²; see csrc/fused/fused_launchers.h).
    copy: a side copy (src, dst) done by the same launch (``dispatch.gemv_group``)."""
    ys = dispatch.gemv_group(list(xs), list(ws), list(acts), out_dtype=out_dtype, copy=copy)
    if ys is None:
        raise DeviceError("the grouped GEMV (rwkv_chat::gemv_multi_cuda) did not take these products: "
                          f"{[tuple(x.shape) for x in xs]} x {[tuple(w.shape) for w in ws]}")
    return ys


def _mm8(xs, qs, acts):
    """Grouped i8 GEMV: ys[e] = act_e(xs[e]) @ dequantize(qs[e]) for output-major Int8Weight qs[e] (stored uint8
    [M, N], N % 16 == 0), 1..4 rows, one launch: the uint8 GEMV of ``csrc/gemvq`` where it serves
    (``dispatch.gemvq_group``), else ``csrc/mm8``'s (the reference's mm8 identity, see ``csrc/mm8/mm8_cuda.cu``);
    act 0 none, 3 relu²."""
    if (ys := dispatch.gemvq_group(list(xs), list(qs), list(acts))) is not None:
        return ys
    rows = xs[0].shape[0]
    ys = [torch.empty(rows, q.shape[1], dtype=xs[0].dtype, device=xs[0].device) for q in qs]
    _ops().mm8_multi_cuda(list(xs), [q.storage for q in qs], [q.mx for q in qs], [q.rx for q in qs], [q.my for q in qs],
                          [q.ry for q in qs], ys, list(acts))
    return ys


def _i8_ok(ws, x) -> bool:
    return all(isinstance(w, Int8Weight) and w.output_major and w.shape[0] % 16 == 0 and w.storage.is_contiguous()
               and w.storage.data_ptr() % 16 == 0 and w.mx.dtype == x.dtype for w in ws)


def _rkv_i4(p: dict, x: torch.Tensor):
    """The r, k, v ``Int4Weight`` of layer ``p`` where ``ops.gptq.fused_v7_mix_rkv_i4`` takes them with x (half
    dtypes, [C, C] weights of one layout and group, no g_idx), else None."""
    ws = [p[n] for n in _BIG[:3]]
    if x.dtype not in (torch.float16, torch.bfloat16) or not all(isinstance(w, Int4Weight) and w.device == x.device
                                                                   for w in ws):
        return None
    q0 = ws[0]
    C = x.shape[-1]
    ok = all(tuple(w.shape) == (C, C) and w.g_idx is None and w.group_size == q0.group_size
             and w.qweight.shape == q0.qweight.shape and w.qweight.stride() == q0.qweight.stride() for w in ws)
    return ws if ok else None


def _probe_mix_rkv(model, ops) -> str | None:
    """None when ``fused_v7_mix_rkv_i4`` runs on the first CUDA layer's i4 weights and equals the two-step path it
    replaces (``v7_mix`` + the int4 products) for 1 and 3 rows, with and without a residual; else why not."""
    p = next((p for p in model.layers if p["ln1.weight"].is_cuda), None)
    if p is None or _rkv_i4(p, p["ln1.weight"]) is None:
        return "no CUDA layer with int4 r/k/v weights"
    from rwkv_chat.models.ops import gptq

    ws = _rkv_i4(p, p["ln1.weight"])
    dt, dev, C = p["ln1.weight"].dtype, p["ln1.weight"].device, p["ln1.weight"].shape[0]
    g = torch.Generator(device=dev).manual_seed(0)
    mix6 = torch.stack([p[f"att.x_{m}"] for m in "rwkvag"]).contiguous()
    try:
        for rows, with_dx in ((1, True), (3, False)):
            x, dx, shift = (torch.randn(rows, C, generator=g, device=dev).to(dt) for _ in range(3))
            dx = dx if with_dx else None
            s_got, s_want = shift.clone(), shift.clone()
            got = gptq.fused_v7_mix_rkv_i4(x, dx, p["ln1.weight"], p["ln1.bias"], s_got, mix6, ws)
            mix = torch.empty(6, rows, C, dtype=dt, device=dev)
            h = torch.empty_like(x) if with_dx else None
            _ops().v7_mix_cuda(x, dx, h, p["ln1.weight"], p["ln1.bias"], s_want, s_want, mix6, mix, 1)
            want = [mix, *(ops.matmul(mix[m], w) for m, w in zip((0, 2, 3), ws)), h if with_dx else x]
            for a, b in zip([*got, s_got], [*want, s_want]):
                if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2):
                    return "fused_v7_mix_rkv_i4 differs from v7_mix + the int4 products"
    except Exception as e:  # noqa: BLE001 — the two-step path serves; the detail says why
        return f"fused_v7_mix_rkv_i4: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _probe_rkv_stack(model, layers: list[dict], key: str) -> str | None:
    """None when the stacked r, k, v of the first CUDA layer that has them (``key``: "rkv_i4", int4, through
    ``dispatch.mm4_stack``; "rkv_i8", i8, through ``dispatch.mm8_stack``) multiply in one launch to the per-matrix
    products of the torch path at 16, 24, 64 and 200 rows (one 16-, 32- and 64-row tile, and four); else why not (the
    caller then multiplies them one by one)."""
    at = next((i for i, f in enumerate(layers) if key in f), None)
    kind = "int4" if key == "rkv_i4" else "i8"
    if at is None:
        return f"no CUDA layer with stacked {kind} r/k/v"
    from rwkv_chat.models.formats.i4 import mm4_torch
    from rwkv_chat.models.formats.i8 import mm8_torch

    name, stacked, plain = (("dispatch.mm4_stack", dispatch.mm4_stack, mm4_torch) if kind == "int4" else
                            ("dispatch.mm8_stack", dispatch.mm8_stack, mm8_torch))
    p = model.layers[at]
    qs = [p[n] for n in _BIG[:3]]
    dt, dev, C = p["ln1.weight"].dtype, p["ln1.weight"].device, qs[0].shape[0]
    g = torch.Generator(device=dev).manual_seed(0)
    try:
        for rows in (16, 24, 64, 200):
            x = torch.randn(3, rows, C, generator=g, device=dev).to(dt)
            got = stacked(x, qs)
            if got is None:
                return f"{name} does not serve these weights"
            for i, q in enumerate(qs):
                if not torch.allclose(got[i].float(), plain(x[i], q).float(), atol=3e-2, rtol=3e-2):
                    return f"{name} differs from the per-matrix products"
    except Exception as e:  # noqa: BLE001 — the per-matrix products serve; the detail says why
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _probe_fold(be: "FusedCuda", model) -> str | None:
    """None when decode steps with ln1 / ln2 inside the GEMV launches (``fold_norms``) fold every layer's ln1 (and
    ln2 where the value product is the grouped GEMV) and agree with the unfolded steps (logits and every state
    tensor within 1e-2 relative, the LayerNorm sums taken in another order) for 1 and 3 rows from a random state;
    else why not."""
    spec, dev = model.spec, model.devices[0]
    dt = model.layers[0]["ln1.weight"].dtype
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    g = torch.Generator(device="cpu").manual_seed(0)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    try:
        with torch.no_grad():
            for b in (1, 3):
                state = []
                for _ in range(model.n_layer):
                    state += [(torch.randn(b, C, generator=g) * 0.5).to(dev, dt),
                              (torch.randn(b, H, N, N, generator=g) * 0.1).to(dev),
                              (torch.randn(b, C, generator=g) * 0.5).to(dev, dt)]
                ids = torch.randint(0, model.emb.shape[0], (b, 1), generator=g).to(dev)
                other = [t.clone() for t in state]
                be.fold_norms = False
                want = be.decode_step(model, ids, state)
                be.fold_norms, be.folded = True, [0, 0]
                got = be.decode_step(model, ids, other)
                if be.folded[0] != model.n_layer or (be.ffn == "gemv" and be.folded[1] != model.n_layer):
                    return (f"ln1 / ln2 ran inside the GEMV launches of {be.folded[0]} / {be.folded[1]} of "
                            f"{model.n_layer} layers (weights or rows the grouped GEMV does not take)")
                if not (torch.isfinite(got).all() and rel(got, want) <= 1e-2
                        and all(rel(x, y) <= 1e-2 for x, y in zip(other, state))):
                    return "ln1 / ln2 inside the GEMV launches differ from the unfolded decode step"
    except Exception as e:  # noqa: BLE001 — the unfolded step serves; the note says why
        return f"ln1 / ln2 inside the GEMV launches: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        be.fold_norms = False
    return None


def _tmix_split(ops, r, k, v, wl, al, g, vl, v_first, p, s, y, H, N):
    """``v7_tmix_one`` as three launches (v7_pre, the WKV-7 kernel at T = 1 updating s in place, v7_post)."""
    b, C = r.shape
    first = vl is None
    w_ = torch.empty(b, C, dtype=torch.float32, device=r.device)
    k_, v_, a_, b_ = (torch.empty_like(r) for _ in range(4))
    ops.v7_pre_cuda(k, v, wl, al, vl, v_first, p["att.w0"], p["att.a0"], p["att.k_k"], p["att.k_a"],
                    None if first else p["att.v0"], w_, k_, v_, a_, b_, H)
    shp = (b, 1, H, N)
    yw = torch.empty(shp, dtype=torch.float32, device=r.device)
    dispatch.wkv7(r.view(shp), w_.view(shp), k_.view(shp), v_.view(shp), a_.view(shp), b_.view(shp), s, out=(yw, s))
    ops.v7_post_cuda(yw, r, k_, v_, g, p["att.r_k"], p["att.ln_x.weight"], p["att.ln_x.bias"], y, H)


#: the six lerps of ``mix6_many`` (decode steps of more than GEMV_ROWS rows): r, k, v then v, w, a contiguous
MANY_ORDER = "rkvwag"


def _stack_many(p: dict, f: dict) -> None:
    """The tensors of decode steps of more than ``GEMV_ROWS`` rows, for one CUDA layer: ``mix6_many`` (the lerps in
    ``MANY_ORDER``, so that r|k|v and v|w|a are each one [3, b, C] slice of the mix output), ``low1`` [3, C, D] and
    ``low2`` [3, D, C] (v1|w1|a1 and v2|w2|a2 zero-padded to the largest D; zeros for v in the first layer: one
    batched GEMM for each stage) and, where r, k, v are plain matrices of one shape and dtype, ``rkv`` [3, C, C]
    (output-major, the model's three matrices becoming views of it: same values, no second copy); where they are
    int4 weights of one shape, ``rkv_i4``: the three become views of one stack (``formats.i4.stack_i4``) that
    ``dispatch.mm4_stack`` multiplies in one launch; fp16 i8 weights alike where ``gemmq.U8_STACK_ENABLED``,
    ``rkv_i8`` (``formats.i8.stack_i8``, ``dispatch.mm8_stack``)."""
    f["mix6_many"] = torch.stack([p[f"att.x_{m}"] for m in MANY_ORDER]).contiguous()
    w1 = [p.get("att.v1"), p["att.w1"], p["att.a1"]]
    w2 = [p.get("att.v2"), p["att.w2"], p["att.a2"]]
    C, D = p["att.w1"].shape[0], max(w.shape[1] for w in w1 if w is not None)
    ref = p["att.w1"]
    f["low1"] = torch.zeros(3, C, D, dtype=ref.dtype, device=ref.device)
    f["low2"] = torch.zeros(3, D, C, dtype=ref.dtype, device=ref.device)
    for i, (a, b) in enumerate(zip(w1, w2)):
        if a is not None:
            f["low1"][i, :, :a.shape[1]] = a
            f["low2"][i, :b.shape[0]] = b
    big = [p[n] for n in _BIG[:3]]
    # on the layer's device only: a streamed layer's matrices stay in the streamer's pinned host memory
    dev = p["ln1.weight"].device
    if all(isinstance(w, torch.Tensor) and w.device == dev and w.dim() == 2 and w.shape == big[0].shape
           and w.dtype == big[0].dtype and w.dtype in (torch.float16, torch.bfloat16, torch.float32) for w in big):
        rkv = torch.empty(3, big[0].shape[1], big[0].shape[0], dtype=big[0].dtype, device=big[0].device)
        for i, n in enumerate(_BIG[:3]):
            rkv[i] = p[n].t()
            p[n] = rkv[i].t()
        f["rkv"] = rkv
    elif all(isinstance(w, Int4Weight) and w.device == dev for w in big) and (stacked := stack_i4(big)) is not None:
        for n, w in zip(_BIG[:3], stacked):
            p[n] = w
        f["rkv_i4"] = True
    elif (_gemmq.U8_STACK_ENABLED
          and all(isinstance(w, Int8Weight) and w.device == dev and w.output_major and w.mx.dtype == torch.float16
                  and w.shape[0] % 128 == 0 for w in big)      # what the uint8 tensor-core GEMM reads
          and (stacked := stack_i8(big)) is not None):
        for n, w in zip(_BIG[:3], stacked):
            p[n] = w
        f["rkv_i8"] = True


def low_rank_many(mix: torch.Tensor, f: dict, bmm=torch.bmm) -> torch.Tensor:
    """The v, w, a low-rank products of a decode step of many rows in two batched GEMMs: mix [6, b, C] in
    ``MANY_ORDER`` (slices 2:5 are xv, xw, xa), f with ``low1`` / ``low2`` of ``_stack_many``. Returns [3, b, C]:
    ``xv @ v1 @ v2`` (zeros in the first layer), ``tanh(xw @ w1) @ w2``, ``xa @ a1 @ a2`` (ChatRWKV
    ``RWKV_x070_TMix_one``; each stage rounded to the activation dtype as the reference rounds it). ``bmm``: the
    batched product (``torch.bmm``, or the tuned ``dispatch.bgemm``)."""
    low = bmm(mix[2:5], f["low1"])
    low[1].tanh_()
    return bmm(low, f["low2"])


def decode_ready(model) -> bool:
    """Whether the fused decode step can serve this model: RWKV-7 without DeepEmbed, every layer and the head
    on one CUDA device (none streamed), a supported head size, and the fused kernels built."""
    if model.version != "7" or not kernels_loaded():
        return False
    devs = {str(d) for d in model.devices}
    if len(devs) != 1 or model.devices[0].type != "cuda" or any(pl.stream for pl in model.plan.layers):
        return False
    p0 = model.layers[0]
    return all(_layer_ok(p, p0["ln1.weight"], model.spec) for p in model.layers)


class FusedCuda(Backend):
    """RWKV-7 with layers on CUDA through the fused kernels: prefill blocks (T > 1) of every CUDA layer the
    kernels serve, and, where ``decode_ready``, the whole one-token decode step. Everything else runs the
    eager blocks on ``ops``.

    Built by ``attach`` at load. Stores the model's CUDA float matrices output-major (same values; the
    model's ``layers`` and ``head`` are updated in place), the fp16 / bf16 channel-mix value matrices input-major
    where ``ffn`` is "sparse" or "dense", and keeps its own per-layer tensors in ``layers``:
    ``mix6`` (the six time-mix lerps stacked, [6, C]), ``mixk`` (the channel-mix lerp, [1, C]) and the
    low-rank matrices output-major ([D, C] for w1/a1/g1/v1, [C, D] for w2/a2/g2/v2); empty for a layer not on
    CUDA.

    Args:
        model: an RWKV-7 ``RWKV`` with a layer on CUDA and the fused kernels built. Building the backend
            again (another ``ffn``) re-lays the matrices out: do it before the model's first forward (CUDA
            graphs captured since would still point at the old matrices).
        ops: the eager ops (compiled kernels).
        ffn: the channel-mix value product of decode steps at <= 4 rows (``decode_step``'s default):
            "gemv" (default: the grouped GEMV on the output-major matrix), "sparse" (the compiled row kernel
            ``dispatch.ffn_rows`` on the input-major matrix, rows where relu(k)² is zero for every row not read)
            or "dense" (the same kernel reading every row; same bits). The chosen one is named in ``detail``.
        mix_rkv: int4 r/k/v through ``ops.gptq.fused_v7_mix_rkv_i4`` (ln1, the mixes and the three products in one
            Triton launch; probed). Off by default: its Triton GEMV read the int4 weights at ~0.4 TB/s on an H100
            (bench/results/h100.md), so v7_mix + the compiled grouped int4 GEMV serve.
        fold_norms: decode steps of <= 4 rows on plain fp16 / bf16 / fp32 matrices run ln1 / ln2 with their residual
            adds and token-shift lerps inside the grouped GEMV launches that take them (``dispatch.ln_mix_gemv_group``;
            the shift states put in place by the next GEMV launch), two launches per layer fewer; probed here against
            the unfolded step (``fold_note`` says why not where it does not serve). Off here by default; ``attach``
            turns it on up to C = ``FOLD_NORMS_MAX_C`` (faster at 0.1B, slower at 1.5B on an H100).
        tuned_gemm: decode steps of more than 4 rows run their fp16 / bf16 products through cuBLASLt with the
            algorithm timed per shape at the first step (``dispatch.gemm(tuned=True)`` / ``dispatch.bgemm``; probed
            here, ``tuned_gemm`` False where the probe fails). On by default: 7.2B at batch 64 1.03x cuBLAS's
            heuristic on an H100, 1.5B even.
        quant_rows: with ``ffn`` "sparse" or "dense", the i8 / f8 channel-mix value matrices too are held input-major
            and served by the row kernel (uint8 / e4m3 rows, relu² of the raw k taken as it loads). Off by default: on
            an H100 at the 7.2B shape the row kernel beats the grouped GEMV per product at one row (i8 18.0 against
            26.0 µs, f8 15.0 against 25.7, 50% rows skipped) but not in the decode step (batch 1 0.99× / 1.02×;
            batch 2 0.82× / 0.89×, batch 4 0.84× / 0.91×: bench/results/h100.md, "Weight formats"), so quantized
            value matrices keep the grouped GEMV of ``csrc/gemvq``.
        wkv7_tensor_cores: prefill's chunked WKV-7 on the tensor cores (``ops.wkv7_chunk``, Triton) where Triton
            serves, else on the CUDA cores (``csrc/wkv7/wkv7_chunk_cuda.cu``): ``dispatch.wkv7(tensor_cores=...)``.
            Off by default: slower so far (H100, T = 1,024, 32 heads: 402.6 us against 238.0; ``rwkv-chat bench
            --wkv7-chunk tensor-cores`` compares the model's prefill).
        persistent_step: decode steps of one row run every layer in one persistent launch
            (``persistent_step.PersistentStep``, ``csrc/fused/v7_step.cu``: fp16 / bf16 plain matrices, head size 64,
            ``ffn`` "gemv"; probed here against the layer launches, ``persistent_note`` says why not where it does not
            serve). Off by default (``rwkv-chat bench --persistent-step`` measures it).

    Raises:
        StrategyError: ``ffn`` not one of ``FFN_MODES``.
    """

    name = "fused-cuda"
    decode_on_device = True

    def __init__(self, model, ops: Ops, ffn: str = "gemv", mix_rkv: bool = False, fold_norms: bool = False,
                 tuned_gemm: bool = True, wkv7_tensor_cores: bool = False, quant_rows: bool = False,
                 persistent_step: bool = False):
        super().__init__(ops)
        if ffn not in FFN_MODES:
            raise StrategyError(f"ffn must be one of {', '.join(FFN_MODES)}; got {ffn!r}")
        #: the value product of decode steps at <= GEMV_ROWS rows: "sparse", "dense" or "gemv"
        self.ffn = ffn
        #: when a list, each value product of a decode step that the row kernel served skipping zero rows appends the
        #: share of rows it left unread (a host sync: for reports over eager steps, never while a graph captures)
        self.skipped: list[float] | None = None
        self.spec = model.spec
        #: the whole one-row decode step in one persistent launch, where it serves (else None: ``persistent_note``)
        self.persistent: PersistentStep | None = None
        self.layers: list[dict[str, torch.Tensor]] = []
        rows = ffn != "gemv"
        #: i8 / f8 channel-mix value matrices held input-major for the row kernel (with ``ffn`` sparse or dense)
        self.quant_rows = quant_rows
        quant_values = False
        for p in model.layers:
            for name in _BIG:
                w = p[name]
                if name == "ffn.value.weight" and not isinstance(w, torch.Tensor):
                    quant_values = True
                laid = rows and name == "ffn.value.weight" and (quant_rows or isinstance(w, torch.Tensor))
                p[name] = _input_major(w, p["ln1.weight"].dtype) if laid else _output_major(w)
            f = {}
            if p["ln1.weight"].is_cuda:
                f["mix6"] = torch.stack([p[f"att.x_{m}"] for m in "rwkvag"]).contiguous()
                f["mixk"] = p["ffn.x_k"].reshape(1, -1).contiguous()
                for name in _LOW:
                    if name in p:
                        f[name] = p[name].t().contiguous()
                _stack_many(p, f)
            self.layers.append(f)
        model.head = _output_major(model.head)
        if rows:
            for d in {w.device for p in model.layers if _rows_ok(w := p["ffn.value.weight"])}:
                triton_gemv._counters(d)     # the split counters, made here (outside any CUDA graph capture)
        self.decodes = decode_ready(model)
        #: int4 r/k/v: ln1 + the six mixes + the r, k, v products in one launch (``ops.gptq.fused_v7_mix_rkv_i4``,
        #: Triton; probed here against v7_mix + the int4 products); why not, where it does not serve
        if not mix_rkv:
            self.mix_rkv_note = "off (FusedCuda(mix_rkv=True) turns it on)"
        else:
            self.mix_rkv_note = _probe_mix_rkv(model, ops) if self.decodes and _triton.available() else "no Triton"
        self.mix_rkv = self.mix_rkv_note is None
        #: int4 r/k/v of decode batches in one launch (``rkv_i4``, probed here); why not, where it does not serve
        self.rkv_stack_note = (_probe_rkv_stack(model, self.layers, "rkv_i4")
                               if self.decodes and _triton.available() else "no Triton or no decode")
        #: the same for i8 r/k/v (``rkv_i8``: the uint8 tensor-core GEMM)
        self.rkv8_stack_note = _probe_rkv_stack(model, self.layers, "rkv_i8") if self.decodes else "no decode"
        for key, note in (("rkv_i4", self.rkv_stack_note), ("rkv_i8", self.rkv8_stack_note)):
            if note is not None:
                for f in self.layers:
                    f.pop(key, None)
        #: ln1 / ln2 inside the grouped GEMV launches of decode steps; why not, where it does not serve
        self.fold_norms = False
        #: how many ln1 and ln2 the decode steps built so far ran inside a GEMV launch (the probe's evidence)
        self.folded = [0, 0]
        if not fold_norms:
            self.fold_note = (f"off (FusedCuda(fold_norms=True) turns it on; the default above C = {FOLD_NORMS_MAX_C}, "
                              "where it measured slower)")
        else:
            self.fold_note = _probe_fold(self, model) if self.decodes else "the model does not decode here"
            self.fold_norms = self.fold_note is None
        if not persistent_step:
            self.persistent_note = "off (FusedCuda(persistent_step=True) turns it on)"
        elif not self.decodes:
            self.persistent_note = "the model does not decode here"
        else:
            self.persistent, self.persistent_note = PersistentStep.build(model, self.layers, ffn)
            if self.persistent is not None:
                self.persistent_note = _persistent.probe(self, model)
                if self.persistent_note is not None:
                    self.persistent = None
        #: decode steps of more than GEMV_ROWS rows run their fp16 / bf16 products through cuBLASLt with the algorithm
        #: timed per shape (``dispatch.gemm(tuned=True)`` / ``dispatch.bgemm``; probed here, outside any capture)
        self.tuned_gemm = bool(tuned_gemm and self.decodes and all(
            dispatch.gemm_tuned_sound(d) for d in model.devices if d.type == "cuda"))
        #: prefill's chunked WKV-7 on the tensor cores (Triton) rather than the CUDA cores
        self.wkv7_tensor_cores = wkv7_tensor_cores
        #: prefill CUDA graphs where the whole model sits on one CUDA device
        self.captures_prefill = self.decodes
        value = {"sparse": "channel-mix value skipping zero rows of relu(k)²",
                 "dense": "channel-mix value by the row kernel, dense",
                 "gemv": "channel-mix value by the grouped GEMV"}[ffn]
        if rows and quant_values and not quant_rows:
            value += " (quantized value matrices: the grouped GEMV)"
        if self.mix_rkv:
            value += "; ln1 + mixes + int4 r/k/v in one launch (Triton)"
        if self.fold_norms:
            value += "; ln1 / ln2 inside the GEMV launches" if ffn == "gemv" else "; ln1 inside the GEMV launch"
        if self.persistent is not None:
            value += "; one row: every layer in one persistent launch"
        if self.tuned_gemm:
            value += "; cuBLASLt algorithm timed per shape above 4 rows"
        pre = " (chunked WKV-7 on the tensor cores)" if wkv7_tensor_cores and _triton.available() else ""
        decode = f", decode step ({value})" if self.decodes else ""
        self.detail = f"fused RWKV-7 layer kernels: prefill blocks{pre}{decode}; eager ops elsewhere"

    @classmethod
    def attach(cls, model, ops: Ops, ffn: str | None = None) -> FusedCuda | None:
        """The backend for ``model`` where it serves it (RWKV-7, the fused kernels built, a layer on CUDA),
        else None. ``ffn``: as the constructor's; None: ``default_ffn`` of the model's width."""
        if model.version != "7" or not kernels_loaded() or not any(d.type == "cuda" for d in model.devices):
            return None
        C = model.spec.n_embd
        return cls(model, ops, ffn or default_ffn(C), fold_norms=C <= FOLD_NORMS_MAX_C)

    # -- prefill -----------------------------------------------------------------------------------
    def sequence_block(self, layer: int, x: torch.Tensor, params: dict):
        """The fused block for a CUDA layer the kernels serve and x [B, T, C] with T > 1, else None."""
        if x.shape[1] > 1 and _layer_ok(params, x, self.spec):
            return self._sequence
        return None

    def _sequence(self, x: torch.Tensor, st: tuple, p: dict, ctx) -> tuple[torch.Tensor, tuple]:
        """``v7.block`` for x [B, T, C] on CUDA through the fused kernels (T > 1: prefill)."""
        ops, mm, f = _ops(), self.ops.matmul, self.layers[ctx.layer]
        B, T, C = x.shape
        H, N = ctx.spec.n_head, ctx.spec.head_size
        att_x, s, ffn_x = st
        dt, dev = x.dtype, x.device
        rows = B * T
        x = x.contiguous()
        mix = torch.empty(6, rows, C, dtype=dt, device=dev)
        new_att_x = torch.empty(B, C, dtype=dt, device=dev)
        ops.v7_mix_cuda(x, None, None, p["ln1.weight"], p["ln1.bias"], att_x.contiguous(), new_att_x,
                        f["mix6"], mix, T)
        xr, xw, xk, xv, xa, xg = mix
        r = mm(xr, p["att.receptance.weight"])
        k = mm(xk, p["att.key.weight"])
        v = mm(xv, p["att.value.weight"])
        wl = torch.tanh(xw @ p["att.w1"]) @ p["att.w2"]
        al = (xa @ p["att.a1"]) @ p["att.a2"]
        g = torch.sigmoid(xg @ p["att.g1"]) @ p["att.g2"]
        first = ctx.v_first is None
        vl = None if first else (xv @ p["att.v1"]) @ p["att.v2"]
        v_first = None if first else ctx.v_first.to(device=dev, dtype=dt).reshape(rows, C).contiguous()
        w_ = torch.empty(rows, C, dtype=torch.float32, device=dev)
        k_, v_, a_, b_ = (torch.empty(rows, C, dtype=dt, device=dev) for _ in range(4))
        ops.v7_pre_cuda(k, v, wl, al, vl, v_first, p["att.w0"], p["att.a0"], p["att.k_k"], p["att.k_a"],
                        None if first else p["att.v0"], w_, k_, v_, a_, b_, H)
        if first:
            ctx.v_first = v.view(B, T, C)
        shp = (B, T, H, N)
        y, s_new = dispatch.wkv7(r.view(shp), w_.view(shp), k_.view(shp), v_.view(shp), a_.view(shp),
                                 b_.view(shp), s.contiguous(), tensor_cores=self.wkv7_tensor_cores)
        out = torch.empty(rows, C, dtype=dt, device=dev)
        ops.v7_post_cuda(y.contiguous(), r, k_, v_, g, p["att.r_k"], p["att.ln_x.weight"], p["att.ln_x.bias"],
                         out, H)
        x = x + mm(out, p["att.output.weight"]).view(B, T, C)
        mk = torch.empty(1, rows, C, dtype=dt, device=dev)
        new_ffn_x = torch.empty(B, C, dtype=dt, device=dev)
        ops.v7_mix_cuda(x, None, None, p["ln2.weight"], p["ln2.bias"], ffn_x.contiguous(), new_ffn_x,
                        f["mixk"], mk, T)
        h = torch.relu(mm(mk[0], p["ffn.key.weight"])).square_()
        x = x + mm(h, p["ffn.value.weight"]).view(B, T, C)
        return x, (new_att_x, s_new, new_ffn_x)

    # -- decode ------------------------------------------------------------------------------------
    def _fold_first(self, ours: bool, i: int, x, dx, p: dict, f: dict, att_x, big: list):
        """Layer i's ln1 (with the residual add of dx) and the six lerps inside the launch of r, k, v and the first
        low-rank products (``dispatch.ln_mix_gemv_group``) -> (r, k, v, [w1, a1, g1(, v1)] outputs, x + dx, ln1
        output: the next att_x, for a later launch to put in place), or None where it does not serve."""
        if not (ours and all(isinstance(w, torch.Tensor) for w in big)):
            return None
        later = i > 0
        m = f["mix6"]                                    # r, w, k, v, a, g
        ws = [w.t() for w in big] + [f["att.w1"], f["att.a1"], f["att.g1"]] + ([f["att.v1"]] if later else [])
        mixes = [m[0], m[2], m[3], m[1], m[4], m[5]] + ([m[3]] if later else [])
        out = dispatch.ln_mix_gemv_group(x, dx, p["ln1.weight"], p["ln1.bias"], att_x, mixes, ws,
                                         [0, 0, 0] + _LOW_ACTS[:len(ws) - 3])
        if out is None:
            return None
        self.folded[0] += 1
        ys, h, xl = out
        return ys[0], ys[1], ys[2], ys[3:], h, xl

    def _fold_key(self, ours: bool, x, att, p: dict, f: dict, ffn_x, fk, fv):
        """ln2 (with the residual add of att) and the channel-mix lerp inside the key launch, where the value
        product is the grouped GEMV (output-major value matrix) -> (relu(k)², x + att, ln2 output: the next ffn_x,
        which the value launch puts in place), or None."""
        if not (ours and isinstance(fk, torch.Tensor) and isinstance(fv, torch.Tensor) and fv.t().is_contiguous()
                and not _rows_laid(fv, x)):
            return None
        out = dispatch.ln_mix_gemv_group(x, att, p["ln2.weight"], p["ln2.bias"], ffn_x, [f["mixk"][0]], [fk.t()],
                                         [RELU2_ON_OUTPUT])
        if out is None:
            return None
        self.folded[1] += 1
        (hk,), h, xl = out
        return hk, h, xl

    def _ffn(self, xk, fk, fv, ours: bool, small: bool, skip: bool, mm):
        """The channel-mix products of a decode step from the lerped ln2 output xk [b, C] -> [b, C]."""
        if ours and isinstance(fk, torch.Tensor) and isinstance(fv, torch.Tensor):
            hk = _gemv([xk], [fk.t()], [RELU2_ON_OUTPUT])[0]     # relu(k) ** 2 written by the key GEMV
            if _rows_laid(fv, hk):                               # input-major: zero rows skipped
                return _value_rows(hk, fv, skip, mm, self.skipped)
            return _gemv([hk], [fv.t()], [0])[0]
        hk = self._big(xk, fk, 0, ours, small)
        if small and not isinstance(fv, torch.Tensor) and _rows_laid(fv, hk):   # i8 / f8 rows: relu² taken on load
            return _value_rows(hk, fv, skip, mm, self.skipped, relu2=True)
        return self._big(hk, fv, 3, ours, small)

    def _big(self, x, w, act: int, gemv: bool, small: bool = False):
        """x @ W for a large matrix; act 3 = relu² on x first. i8 weights at <= 4 rows: the grouped mm8 GEMV;
        i4 / f8 weights: the compiled GEMV of ``csrc/gemvq`` (relu² applied as it loads x) where it serves."""
        if gemv and isinstance(w, torch.Tensor):
            return _gemv([x], [w.t()], [act])[0]
        if small and _i8_ok([w], x):
            return _mm8([x], [w], [act])[0]
        if small and (y := dispatch.gemvq_group([x], [w], [act])) is not None:
            return y[0]
        if act == 3:
            x = torch.relu(x).square()
        return self.ops.matmul(x, w) if small else self._many(x, w)

    def _many(self, x, w):
        """x @ W at more than GEMV_ROWS rows: plain matrices through ``dispatch.gemm(tuned=True)`` with
        ``tuned_gemm`` (the per-shape tuned cuBLASLt GEMM for fp16 / bf16, torch for the rest), else the model's
        product."""
        if self.tuned_gemm and isinstance(w, torch.Tensor):
            return dispatch.gemm(x, w, tuned=True)
        return self.ops.matmul(x, w)

    def decode_step(self, model, ids: torch.Tensor, state: list[torch.Tensor], gemv: str = "ours",
                    large_wkv: str = "one", ffn: str | None = None) -> torch.Tensor:
        """The whole model for one token per row through the fused kernels (where ``decodes``).

        Args:
            model: the RWKV-7 model this backend was built for (one CUDA device).
            ids: long [b, 1] token ids on that device.
            state: flat per-layer state (att_x [b, C], att_kv float32 [b, H, N, N], ffn_x [b, C] per layer),
                contiguous, updated in place.
            gemv: "ours" (grouped GEMV kernel for every product at b <= 4) or "cublas" (large matrices via
                cuBLAS, low-rank via the grouped GEMV). i8 weights at b <= 4 use the grouped mm8 GEMV.
            large_wkv: b > 4 rows: "one" (``v7_tmix_one``: one pass over the state, read and written once in
                place, moved through shared memory in coalesced rows) or "split" (``v7_pre`` + the row-split
                WKV-7 kernel + ``v7_post``).
            ffn: with gemv "ours", the channel-mix value product: "sparse" or "dense" (the row kernel skipping
                the zero rows of relu(k)² or not; same bits) where the backend stores that matrix input-major
                (``self.ffn`` "sparse" or "dense"; the grouped GEMV otherwise). None: ``self.ffn``.
        Returns:
            logits float32 [b, vocab].
        """
        ops, mm = _ops(), self.ops.matmul
        b = ids.shape[0]
        spec = model.spec
        H = spec.n_head
        small = b <= GEMV_ROWS
        ours = small and gemv == "ours"
        skip = (ffn or self.ffn) != "dense"
        if b == 1 and ours and self.persistent is not None:       # every layer in one launch
            x, dx = self.persistent.run(model, ids, state)
            return self._logits(model, x, dx, ours, small)
        x = torch.index_select(model.emb, 0, ids.view(-1))    # [b, C]
        C = x.shape[-1]
        dx = None
        v_first = None
        for i in range(model.n_layer):
            p, f = model.layers[i], self.layers[i]
            att_x, s, ffn_x = state[3 * i:3 * i + 3]
            rkv_i4 = _rkv_i4(p, x) if small and self.mix_rkv else None
            big = [p["att.receptance.weight"], p["att.key.weight"], p["att.value.weight"]]
            first = i == 0
            folded = self._fold_first(ours, i, x, dx, p, f, att_x, big) if self.fold_norms else None
            if folded is not None:      # ln1 + the mixes inside the r/k/v + first low-rank launch
                r, k, v, low, x, shift1 = folded
            elif rkv_i4 is not None:    # ln1, the mixes and the int4 r/k/v products: one launch
                mix, r, k, v, x = fused_gptq.fused_v7_mix_rkv_i4(x, dx, p["ln1.weight"], p["ln1.bias"], att_x,
                                                                f["mix6"], rkv_i4)
            else:
                mix = torch.empty(6, b, C, dtype=x.dtype, device=x.device)
                xn = torch.empty_like(x) if dx is not None else None
                ops.v7_mix_cuda(x, dx, xn, p["ln1.weight"], p["ln1.bias"], att_x, att_x,
                                f["mix6"] if small else f["mix6_many"], mix, 1)
                x = xn if xn is not None else x
            if folded is None and small:
                xr, xw, xk, xv, xa, xg = mix
            elif folded is None:
                xr, xk, xv, xw, xa, xg = mix
            if folded is not None:
                ws2 = [f["att.w2"], f["att.a2"], f["att.g2"]] + ([] if first else [f["att.v2"]])
                stage2 = _gemv(low, ws2, [0] * len(ws2), copy=(shift1, att_x))     # att_x <- ln1 (all have read it)
                wl, al, g = stage2[:3]
                vl = None if first else stage2[3]
            elif small:
                xs, ws = [xw, xa, xg], [f["att.w1"], f["att.a1"], f["att.g1"]]
                if not first:
                    xs.append(xv)
                    ws.append(f["att.v1"])
                low_acts = _LOW_ACTS[:len(xs)]
                if rkv_i4 is not None:
                    low = _gemv(xs, ws, low_acts)
                elif ours and all(isinstance(w, torch.Tensor) for w in big):
                    out = _gemv([xr, xk, xv] + xs, [w.t() for w in big] + ws, [0, 0, 0] + low_acts)
                    r, k, v, low = out[0], out[1], out[2], out[3:]
                elif _i8_ok(big, x):
                    r, k, v = _mm8([xr, xk, xv], big, [0, 0, 0])
                    low = _gemv(xs, ws, low_acts)
                elif (grouped := dispatch.gemvq_group([xr, xk, xv], big)) is not None:    # i4 / f8 weights
                    r, k, v = grouped
                    low = _gemv(xs, ws, low_acts)
                else:
                    r, k, v = (mm(xx, w) for xx, w in zip((xr, xk, xv), big))
                    low = _gemv(xs, ws, low_acts)
                ws2 = [f["att.w2"], f["att.a2"], f["att.g2"]] + ([] if first else [f["att.v2"]])
                stage2 = _gemv(low, ws2, [0] * len(ws2))
                wl, al, g = stage2[:3]
                vl = None if first else stage2[3]
            else:       # batched GEMMs: r|k|v (plain matrices), v|w|a's two low-rank stages
                bmm = dispatch.bgemm if self.tuned_gemm else torch.bmm
                if "rkv" in f:
                    r, k, v = bmm(mix[0:3], f["rkv"].transpose(1, 2))
                elif "rkv_i4" in f and (rkv := dispatch.mm4_stack(mix[0:3], [p[n] for n in _BIG[:3]])) is not None:
                    r, k, v = rkv
                elif "rkv_i8" in f and (rkv := dispatch.mm8_stack(mix[0:3], [p[n] for n in _BIG[:3]])) is not None:
                    r, k, v = rkv
                else:
                    r, k, v = (self._many(xx, p[n]) for xx, n in ((xr, "att.receptance.weight"),
                                                                 (xk, "att.key.weight"), (xv, "att.value.weight")))
                vl, wl, al = low_rank_many(mix, f, bmm)
                vl = None if first else vl
                g = torch.sigmoid(xg @ p["att.g1"]) @ p["att.g2"]
            y = torch.empty_like(x)
            if small or large_wkv == "one":   # one block per (row, head): pre + state step + post
                ops.v7_tmix_one_cuda(r, k, v, wl, al, g, vl, v_first, p["att.w0"], p["att.a0"], p["att.k_k"],
                                     p["att.k_a"], None if first else p["att.v0"], p["att.r_k"],
                                     p["att.ln_x.weight"], p["att.ln_x.bias"], s, y, H, not small)
            else:       # many rows: the row-split WKV-7 kernel (4 blocks per head, state in place) keeps more
                _tmix_split(ops, r, k, v, wl, al, g, vl, v_first, p, s, y, H, spec.head_size)   # SMs busy
            if first:
                v_first = v
            att = self._big(y, p["att.output.weight"], 0, ours, small)
            fk, fv = p["ffn.key.weight"], p["ffn.value.weight"]
            folded = self._fold_key(ours, x, att, p, f, ffn_x, fk, fv) if self.fold_norms else None
            if folded is not None:      # ln2 + the lerp inside the key launch; ffn_x put in place by the value's
                hk, x, shift2 = folded
                dx = _gemv([hk], [fv.t()], [0], copy=(shift2, ffn_x))[0]
            else:
                xk2 = torch.empty(1, b, C, dtype=x.dtype, device=x.device)
                xn = torch.empty_like(x)
                ops.v7_mix_cuda(x, att, xn, p["ln2.weight"], p["ln2.bias"], ffn_x, ffn_x, f["mixk"], xk2, 1)
                x = xn
                dx = self._ffn(xk2[0], fk, fv, ours, small, skip, mm)
        return self._logits(model, x, dx, ours, small)

    def _logits(self, model, x, dx, ours: bool, small: bool) -> torch.Tensor:
        """ln_out of x + dx ([b, C] each) and the head: logits float32 [b, vocab]."""
        b, C = x.shape
        xo = torch.empty(1, b, C, dtype=x.dtype, device=x.device)
        ln_w, ln_b = model.ln_out
        _ops().v7_mix_cuda(x, dx, None, ln_w, ln_b, None, None, ln_w.new_empty(0, C), xo, 1)
        hw = model.head
        if ours and isinstance(hw, torch.Tensor):
            return _gemv([xo[0]], [hw.t()], [0], out_dtype=torch.float32)[0]
        return self._big(xo[0], hw, 0, False, small).float()
