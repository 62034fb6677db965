"""The decode step's attention in Triton: RoPE + KV-cache write of the new token, and attention over each row's
own cached length (compiled at first use on CUDA).

A batched decode step feeds one token per row; row r's cache holds ``lens[r]`` positions and its new token sits at
position ``lens[r]``. Two ops replace RoPE, two scatters and a masked SDPA (Hugging Face ``apply_rotary_pos_emb``
and ``scaled_dot_product_attention``; formulas in ``rmsnorm_rope.py`` and ``_decode_kernels.py``):

    q = rope_store(qkv, cos, sin, lens, k_cache, v_cache, num_heads)     # q [b, H, D]; cache slots written
    o = decode_attention(q, k_cache, v_cache, lens)                        # o [b, H, D]

``rope_store`` reads q, k, v straight from the packed projection ``qkv`` [b, (H + 2K) D] (q heads, then k heads,
then v heads: the output of one GEMM over ``wq|wk|wv``), rotates q and k at each row's position (cos/sin: the
model's whole tables [P, D], read at row ``lens[r]``; Qwen3: per-head RMSNorm first) and writes k and v into
``k_cache``/``v_cache`` [>= b, K, capacity, D] at ``[r, :, lens[r]]``, one launch. ``decode_attention`` attends
row r over positions ``0 .. lens[r]`` (GQA: H % K == 0, query head h reads key/value head h // (H / K)), scale
1/sqrt(D) by default, fp32 softmax, split along the positions when the grid would otherwise leave
multiprocessors idle (flash-decoding; a small combine launch merges the splits).

Both are graph-safe: no host sync, the launch grid depends only on shapes (the capacity), never on the device
values of ``lens``. ``lens[r] < capacity`` and ``lens[r] <`` the rows of cos/sin are the caller's contract (not
checked: a device value; the kernels clamp their cache reads and writes to the capacity and their cos/sin reads to
the tables' rows).

Errors (validated before anything runs): ``UnsupportedDtypeError`` (``decode_attention``: float16/bfloat16 only;
``rope_store``: float16/bfloat16/float32; ``lens`` int32/int64), ``ShapeMismatchError`` (``tensor``,
``expected``, ``actual``), ``DeviceError`` (not on CUDA, two devices, no Triton).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.ops import _checks, _triton
from rwkv_chat.models.ops._triton import multiprocessors as _sms

_ROPE = "rwkv_chat.models.ops._rmsnorm_rope_kernels"
_ATTN = "rwkv_chat.models.ops._decode_kernels"
INDEX_DTYPES = (torch.int32, torch.int64)
#: cached positions per inner iteration of the attention kernel
BLOCK_N = 64
#: a capacity up to which one pass (no split, no combine) serves whatever the grid
ONE_PASS = 256



def _cache(t, name: str, like: torch.Tensor, b: int, heads: int, d: int) -> None:
    _checks.check_dtype(t, name)
    _checks.check_same_dtype({"q": like, name: t}, "q")
    _checks.check_dim(t, name, (4,))
    _checks.check_shape(t, name, (None, heads, None, d))
    if t.shape[0] < b:
        raise ShapeMismatchError(f"{name} has {t.shape[0]} rows; the step has {b}", tensor=name,
                                 expected=(b, heads, None, d), actual=tuple(t.shape))
    if t.stride(-1) != 1:
        raise ShapeMismatchError(f"{name} has strides {t.stride()}; its last dim must be contiguous", tensor=name,
                                 expected="stride 1 in the last dim", actual=tuple(t.stride()))


def _lens(lens, b: int) -> None:
    _checks.check_dtype(lens, "lens", INDEX_DTYPES)
    _checks.check_shape(lens, "lens", (b,))


def _store_inputs(qkv, cos, sin, lens, k_cache, v_cache, num_heads, q_weight, k_weight):
    """``rope_store``'s validation: (qkv with a contiguous last dim, b, K, D, per-head norm?, tensors by name)."""
    _checks.check_dtype(qkv, "qkv")
    _checks.check_dim(qkv, "qkv", (2,))
    _checks.check_dtype(cos, "cos")
    _checks.check_dtype(sin, "sin")
    _checks.check_dim(cos, "cos", (2,))
    d = cos.shape[1]
    _checks.check_shape(sin, "sin", tuple(cos.shape))
    if d <= 0 or d % 2:
        raise ShapeMismatchError(f"cos has shape {tuple(cos.shape)}; its last dim (head_dim) must be even",
                                 tensor="cos", expected="(P, even head_dim)", actual=tuple(cos.shape))
    b = qkv.shape[0]
    kv = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    width = (num_heads + 2 * kv) * d
    _checks.check_shape(qkv, "qkv", (b, width))
    _cache(k_cache, "k_cache", qkv, b, kv, d)
    _cache(v_cache, "v_cache", qkv, b, kv, d)
    _checks.check_shape(v_cache, "v_cache", (None, kv, k_cache.shape[2], d))
    _lens(lens, b)
    tensors = {"qkv": qkv, "cos": cos, "sin": sin, "lens": lens, "k_cache": k_cache, "v_cache": v_cache}
    norm = q_weight is not None or k_weight is not None
    if norm:
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            _checks.check_dtype(w, name)
            _checks.check_shape(w, name, (d,))
            tensors[name] = w
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv, b, kv, d, norm, tensors


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, num_heads: int, q_weight: torch.Tensor | None = None,
               k_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RoPE of the new token's q and k at each row's position, k and v written into the cache, one launch.

    qkv: ``[b, (H + 2K) * D]`` (last dim contiguous); cos, sin: ``[P, D]`` float tables (P > every lens value);
    lens: int64/int32 ``[b]`` (row r's position); k_cache, v_cache: ``[>= b, K, capacity, D]`` in qkv's dtype,
    last dim contiguous; num_heads: H. q_weight, k_weight: ``[D]`` (both or neither): Qwen3's per-head RMSNorm of
    q and k (epsilon ``eps``) before RoPE. Returns q ``[b, H, D]`` (new, qkv's dtype); the caches are written at
    ``[r, :, lens[r]]``. Raises as the module says.
    """
    qkv, b, kv, d, norm, tensors = _store_inputs(qkv, cos, sin, lens, k_cache, v_cache, num_heads, q_weight,
                                                 k_weight)
    _checks.check_cuda(tensors)
    kern = _triton.kernels(_ROPE, op="rope_store")
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty(b, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if b:
        bq, bk, bhalf = _triton.next_pow2(num_heads), _triton.next_pow2(kv), _triton.next_pow2(d // 2)
        qw = q_weight.contiguous() if norm else q
        kw = k_weight.contiguous() if norm else q
        kern.rope_store_kernel[(b,)](
            qkv, cos, sin, lens, k_cache, v_cache, q, qw, kw, qkv.stride(0), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), q.stride(0), q.stride(1), num_heads, kv, k_cache.shape[2], cos.shape[0], float(eps),
            HALF=d // 2,
            BLOCK_HQ=bq,
            BLOCK_HK=bk, BLOCK_HALF=bhalf, NORM=1 if norm else 0, num_warps=4 if bq * bhalf <= 1024 else 8)
    return q


def splits_for(b: int, kv_heads: int, capacity: int, device: torch.device | None) -> int:
    """How many splits of the positions ``decode_attention`` runs: 1 for a capacity up to ``ONE_PASS`` or a grid
    of b·K programs that already fills every multiprocessor; else enough splits (of whole BLOCK_N tiles) for
    about two programs per multiprocessor."""
    if capacity <= ONE_PASS:
        return 1
    sms = _sms(device) if device is not None and device.type == "cuda" else 132
    if b * kv_heads >= sms:
        return 1
    return max(1, min(-(-2 * sms // (b * kv_heads)), -(-capacity // BLOCK_N)))


class _Launch:
    """What an attention launch over a cache of ``cap`` positions needs beside its tensors: the splits of the
    positions (``splits_for`` by default; each whole BLOCK_N tiles), the query heads per key/value head, block
    sizes, the base-2 score scale, and the float32 partials (running max, sum, output of every (row, head, split))
    that ``combine`` merges into ``out`` when the positions are split."""

    def __init__(self, b: int, heads: int, kv: int, d: int, cap: int, out: torch.Tensor, scale: float | None,
                 splits: int | None):
        n_split = splits_for(b, kv, cap, out.device) if splits is None else max(1, min(int(splits),
                                                                                        -(-cap // BLOCK_N)))
        self.split_len = -(-(-(-cap // n_split)) // BLOCK_N) * BLOCK_N
        self.n_split = -(-cap // self.split_len)
        self.group = heads // kv
        self.bd, self.bg = max(16, _triton.next_pow2(d)), max(16, _triton.next_pow2(self.group))
        self.qk_scale = (d ** -0.5 if scale is None else float(scale)) * 1.4426950408889634   # log2(e): exp2 inside
        self.b, self.heads, self.d, self.out = b, heads, d, out
        if self.n_split == 1:
            self.pm = self.pl = self.po = out
        else:
            self.pm = torch.empty(b * heads * self.n_split, dtype=torch.float32, device=out.device)
            self.pl = torch.empty_like(self.pm)
            self.po = torch.empty(b * heads * self.n_split * d, dtype=torch.float32, device=out.device)

    def combine(self, kern) -> None:
        """Merge the splits of each (row, query head) into ``out`` (nothing with one split)."""
        if self.n_split > 1:
            out = self.out
            kern.decode_combine_kernel[(self.b, self.heads)](
                self.pm, self.pl, self.po, out, out.stride(0), out.stride(1), self.heads, self.n_split, HEAD_D=self.d,
                BLOCK_D=self.bd, BLOCK_S=max(2, _triton.next_pow2(self.n_split)), num_warps=4)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                     scale: float | None = None, splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per row over that row's cached positions ``0 .. lens[r]``.

    q: ``[b, H, D]`` float16/bfloat16 (last dim contiguous); k_cache, v_cache: ``[>= b, K, capacity, D]`` in q's
    dtype (H % K == 0), last dim contiguous; lens: int64/int32 ``[b]``, each < capacity (the new key/value already
    at position ``lens[r]``). scale: default ``D ** -0.5``. splits: of the positions (default ``splits_for``).
    Returns ``[b, H, D]`` in q's dtype: ``softmax(q kᵀ · scale) v`` with fp32 softmax and accumulation.
    Raises as the module says (and ShapeMismatchError when H is not a multiple of K).
    """
    _checks.check_dtype(q, "q", _checks.HALF_DTYPES)
    _checks.check_dim(q, "q", (3,))
    b, heads, d = q.shape
    kv = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    _cache(k_cache, "k_cache", q, b, kv, d)
    _cache(v_cache, "v_cache", q, b, kv, d)
    _checks.check_shape(v_cache, "v_cache", (None, kv, k_cache.shape[2], d))
    if kv == 0 or heads % kv:
        raise ShapeMismatchError(f"q has {heads} heads, the cache {kv}: a multiple is needed (GQA)", tensor="q",
                                 expected=f"(b, a multiple of {kv}, {d})", actual=tuple(q.shape))
    _lens(lens, b)
    if q.stride(-1) != 1:
        q = q.contiguous()
    _checks.check_cuda({"q": q, "k_cache": k_cache, "v_cache": v_cache, "lens": lens})
    kern = _triton.kernels(_ATTN, op="decode_attention")
    cap = k_cache.shape[2]
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    a = _Launch(b, heads, kv, d, cap, out, scale, splits)
    kern.decode_attention_kernel[(b, kv, a.n_split)](
        q, k_cache, v_cache, lens, out, a.pm, a.pl, a.po, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0),
        out.stride(1), a.group, heads, a.n_split, a.split_len, cap, a.qk_scale, HEAD_D=d, BLOCK_D=a.bd,
        BLOCK_G=a.bg, BLOCK_N=BLOCK_N, SPLIT=a.n_split > 1, num_warps=4)
    a.combine(kern)
    return out


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, q_weight: torch.Tensor | None = None,
                   k_weight: torch.Tensor | None = None, eps: float = 1e-6, scale: float | None = None,
                   splits: int | None = None) -> torch.Tensor:
    """``decode_attention(rope_store(qkv, ...), k_cache, v_cache, lens)`` in one launch (two with split positions:
    the combine): the new token's q and k rotated in registers, k and v written into the cache at ``lens[r]``, each
    row attending over ``0 .. lens[r]``. Arguments as ``rope_store`` (qkv float16/bfloat16 here) plus ``scale``
    and ``splits`` as ``decode_attention``. Returns ``[b, H, D]`` in qkv's dtype. Raises as both."""
    qkv, b, kv, d, norm, tensors = _store_inputs(qkv, cos, sin, lens, k_cache, v_cache, num_heads, q_weight,
                                                 k_weight)
    _checks.check_dtype(qkv, "qkv", _checks.HALF_DTYPES)
    if kv == 0 or num_heads % kv:
        raise ShapeMismatchError(f"{num_heads} query heads, the cache {kv}: a multiple is needed (GQA)",
                                 tensor="num_heads", expected=f"a multiple of {kv}", actual=num_heads)
    _checks.check_cuda(tensors)
    kern = _triton.kernels(_ATTN, op="rope_attention")
    cos, sin = cos.contiguous(), sin.contiguous()
    cap = k_cache.shape[2]
    out = torch.empty(b, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if b == 0:
        return out
    a = _Launch(b, num_heads, kv, d, cap, out, scale, splits)
    qw = q_weight.contiguous() if norm else out
    kw = k_weight.contiguous() if norm else out
    kern.rope_attention_kernel[(b, kv, a.n_split)](
        qkv, cos, sin, lens, k_cache, v_cache, qw, kw, out, a.pm, a.pl, a.po, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), a.group, num_heads, kv, a.n_split, a.split_len, cap,
        cos.shape[0], a.qk_scale, float(eps), HALF=d // 2, BLOCK_HALF=max(16, _triton.next_pow2(d // 2)),
        BLOCK_D=a.bd, BLOCK_G=a.bg, BLOCK_N=BLOCK_N, SPLIT=a.n_split > 1, NORM=1 if norm else 0, num_warps=4)
    a.combine(kern)
    return out
