"""The ``i4`` weight format: 4-bit integers in the GPTQ layout, round-to-nearest quantized per group.

Layout (the one GPTQ checkpoints use: AutoGPTQ, GPTQModel, ``transformers``' GPTQ integration). A float weight
``W`` [K, N] (input × output, the formats' logical orientation; a ``nn.Linear`` weight transposed) is stored as

* ``qweight`` int32 [K/8, N]: packed along K, eight 4-bit values per int32, low nibble first
  (``q[k, n] = (qweight[k // 8, n] >> (4 * (k % 8))) & 15``);
* ``qzeros`` int32 [K/group, N/8]: packed along N the same way (``(qzeros[g, n // 8] >> (4 * (n % 8))) & 15``);
* ``scales`` float16 [K/group, N];
* ``g_idx`` int32 [K] (optional): the group of each input row (GPTQ's ``desc_act``); without it row k is in
  group ``k // group``.

Zero-point convention (AutoGPTQ "v1" checkpoints, the format on the Hub): the stored zero is ``z - 1``, so

    w[k, n] = (q[k, n] - (z_stored[g, n] + 1)) * scales[g, n],    g = g_idx[k] or k // group

and ``z_stored + 1`` is taken modulo 16: a zero point of 0 is stored as -1, i.e. nibble 15 (AutoGPTQ's
packing wraps it that way), and reads back as 0. Zero points are 0..15.

Quantization (``quantize_i4``): round to nearest per group of ``group`` input rows and output column, the
range widened to include 0 (AutoGPTQ's ``Quantizer.find_params`` with ``sym=False``): ``scale = (max - min) /
15``, ``z = round(-min / scale)``, ``q = clamp(round(w / scale) + z, 0, 15)``. The group is 128, or the
largest divisor of K (padded to a multiple of 8) not above 128 when 128 does not divide it (tiny models have
64-wide matrices). K and N that are not multiples of 8 are padded with zeros (``Int4Weight.shape`` keeps
the logical [K, N]; ``dequantize`` and products use only that part).

Which weights: the large projections the model's generations mark "matrix", as for ``i8``, but not the head
(RWKV ``head.weight``, Qwen2 ``lm_head``): an ``i4`` stage keeps it in the activation dtype
(``rwkv_chat.models.strategy.HEAD_IN_ACTIVATION``; the plan shows it as ``(head in float16)``), as the GPTQ
ecosystem does by default (AutoGPTQ and llama.cpp keep ``lm_head`` / ``output.weight`` in higher precision);
on the tiny models a 4-bit head alone costs most of the top-1 agreement. A pre-quantized checkpoint whose head
is quantized keeps its quantized head. Embeddings, norms, RWKV time-mix vectors and the low-rank matrices stay
in the activation dtype.

GPTQ checkpoints (e.g. Qwen2 folders with ``quantization_config.quant_method = "gptq"``) load without
re-quantizing: ``gptq_group_size(config)`` checks the config, ``gptq_linear(tensors, "model.layers.0.self_attn.q_proj",
config)`` (or ``from_gptq(qweight, qzeros, scales, g_idx)``) returns the ``Int4Weight`` a model multiplies with
``ctx.ops.matmul`` / ``rwkv_chat.models.kernels.mm4`` (x [..., in_features] -> [..., out_features]; the
Linear's bias is added by the caller).

Layouts in memory: the GPTQ layout above is what loads and what is saved (``formats.serialize``, converted
files, GPTQ checkpoints). On CUDA the packed words are held output-major instead (``Int4Weight.output_major``:
``qweight`` the transposed view of a contiguous int32 [Np, Kp/8], each output's nibbles contiguous along K, the
same words), converted once when the weight moves there (``Int4Weight.to``); zeros, scales and g_idx keep the
GPTQ layout. Every reader takes either layout: ``dequantize``, ``serialize.parts`` (writes the GPTQ layout), the
Triton kernels (strided ``qweight``), the CUDA GEMV (output-major only).

Products: ``matmul`` dequantizes in torch and multiplies (any device); ``rwkv_chat.models.kernels.mm4``
(the format's ``kernel``) serves 1..4 rows on CUDA with the compiled GEMV of ``csrc/gemvq`` where it is built
(output-major weight, no g_idx, K and the group multiples of 32), 5 to ``rwkv_chat.models.ops.gemv.I4_ROWS`` rows
(decode batches) with the compiled GEMM on the tensor cores (``csrc/gemvq/gemmq_cuda.cu``, ``kernels.gemmq``: the
words dequantized in registers into the mma operand; K and the group multiples of 128), else up to ``I4_ROWS`` rows
with a Triton kernel that dequantizes in registers (``models/ops/_gemv_kernels.py``), more rows by dequantizing
once and cuBLAS (prefill); on the CPU up to ``dispatch.I4_CPU_ROWS`` rows
with the compiled product of ``csrc/gemvq/gemvq_cpu.cpp`` (GPTQ layout read as stored, no g_idx, the group a
multiple of 8), more rows by dequantizing once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.i8 import prefers_output_major
from rwkv_chat.models.formats.packed import PackedFormat, place

#: the group size of ``quantize_i4`` where it divides K
GROUP = 128
#: the clipping ranges ``quantize_i4`` tries per group and column (fractions of the min/max range); the one with
#: the least squared error wins (the grid search of GPTQ's ``Quantizer(mse=True)``, without calibration data)
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values along dim 0: int [R, C] in 0..15 (R % 8 == 0) -> int32 [R/8, C], low nibble first
    (``out[i, c] = sum_j q[8i + j, c] << 4j``, two's complement wrap for the top nibble).

    Raises: ShapeMismatchError (not 2-D, or R not a multiple of 8).
    """
    if q.dim() != 2 or q.shape[0] % 8:
        raise ShapeMismatchError(f"pack_rows needs [R, C] with R % 8 == 0, got {tuple(q.shape)}",
                                 tensor="q", expected="[8·r, C]", actual=tuple(q.shape))
    v = q.to(torch.int64).reshape(q.shape[0] // 8, 8, q.shape[1]) & 15
    word = (v << torch.arange(0, 32, 4, dtype=torch.int64, device=v.device).view(1, 8, 1)).sum(1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_rows``: int32 [R/8, C] -> int32 [R, C] in 0..15."""
    v = (packed.unsqueeze(1) >> torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device).view(1, 8, 1)) & 15
    return v.reshape(packed.shape[0] * 8, packed.shape[1])


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values along dim 1: int [R, C] in 0..15 (C % 8 == 0) -> int32 [R, C/8], low nibble first."""
    return pack_rows(z.t().contiguous()).t().contiguous()


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_cols``: int32 [R, C/8] -> int32 [R, C] in 0..15."""
    return unpack_rows(packed.t().contiguous()).t().contiguous()


def group_size_for(k: int, preferred: int = GROUP) -> int:
    """The group of a K-row matrix: ``preferred`` where it divides K, else the largest divisor of K below it."""
    if k % preferred == 0:
        return preferred
    return max(d for d in range(1, min(preferred, k) + 1) if k % d == 0)


def _up8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass
class Int4Weight:
    """A weight in the GPTQ int4 layout (module docstring), logically [K, N] (input × output).

    ``qweight`` is always the logical int32 [Kp/8, Np] matrix of the GPTQ layout; ``output_major`` says how its
    words lie in memory:

    * ``False`` (the GPTQ layout: what is loaded, converted and saved): ``qweight`` is contiguous [Kp/8, Np].
    * ``True`` (CUDA: the decode GEMV ``csrc/gemvq`` reads each output's Kp/2 bytes contiguously): ``qweight``
      is the transposed view ``storage.t()`` of a contiguous int32 [Np, Kp/8] tensor (row n: output n's Kp
      nibbles, eight per word along K, low nibble first, the same words as the GPTQ layout).

    ``qzeros``, ``scales`` and ``g_idx`` are the same in both layouts. Values, ``shape``, ``dequantize`` and
    ``nbytes`` do not depend on the layout; ``to(device)`` converts to the layout the target device's kernels
    read (``prefers_output_major``: output-major on CUDA) unless ``output_major`` is given, so a weight is held
    once, in one layout.

    Attributes:
        qweight: int32 [Kp/8, Np] (logical; laid out as ``output_major`` says); qzeros: int32 [Kp/group, Np/8];
        scales: float16 [Kp/group, Np]; g_idx: int32 [Kp] or None. Kp, Np: K and N rounded up to multiples of
        8 (zero padding). group_size: input rows per group. shape: the logical (K, N). output_major: the flag above.
    Raises (on construction):
        ShapeMismatchError: ``output_major`` and ``qweight`` is not the transposed view of a contiguous tensor.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    group_size: int
    shape: tuple = field(default=())
    output_major: bool = False

    def __post_init__(self):
        if not self.shape:
            self.shape = (self.qweight.shape[0] * 8, self.qweight.shape[1])
        self.shape = torch.Size(self.shape)
        if self.output_major and isinstance(self.qweight, torch.Tensor) and not (
                self.qweight.dim() == 2 and self.qweight.t().is_contiguous()):
            raise ShapeMismatchError(f"an output-major i4 weight needs qweight = (contiguous [Np, Kp/8]).t(), got "
                                     f"shape {tuple(self.qweight.shape)} strides {self.qweight.stride()}",
                                     tensor="qweight", expected="transposed contiguous", actual=self.qweight.stride())

    @property
    def dtype(self) -> torch.dtype:
        return torch.int32

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def storage(self) -> torch.Tensor:
        """The int32 words as stored: [Np, Kp/8] if ``output_major`` else [Kp/8, Np] (contiguous when built here)."""
        return self.qweight.t() if self.output_major else self.qweight

    def _map(self, fn) -> "Int4Weight":
        """``fn`` applied to every tensor, ``qweight`` through its storage (the layout is kept)."""
        stored = fn(self.storage)
        return Int4Weight(stored.t() if self.output_major else stored, fn(self.qzeros), fn(self.scales),
                          None if self.g_idx is None else fn(self.g_idx), self.group_size, self.shape,
                          self.output_major)

    def with_layout(self, output_major: bool) -> "Int4Weight":
        """The same weight in the given layout on its device (``self`` where it already is); the words are
        transposed once, nothing else changes."""
        if output_major == self.output_major:
            return self
        qweight = self.qweight.t().contiguous().t() if output_major else self.qweight.contiguous()
        return Int4Weight(qweight, self.qzeros, self.scales, self.g_idx, self.group_size, self.shape, output_major)

    def to(self, device=None, non_blocking: bool = False, output_major: bool | None = None) -> "Int4Weight":
        """This weight on ``device`` (default: its own), in the layout ``output_major`` (default: the one
        ``prefers_output_major(device)`` names: output-major on CUDA). The bytes move once; the layout changes
        on the CUDA side of the move (a transpose there is fast)."""
        target = torch.device(device) if device is not None else self.device
        layout = prefers_output_major(target) if output_major is None else output_major
        q = self.with_layout(layout) if self.device.type == "cuda" else self
        if target != q.device:
            q = q._map(lambda t: t.to(device=target, non_blocking=non_blocking))
        return q.with_layout(layout)

    def contiguous(self) -> "Int4Weight":
        """Every tensor contiguous in its layout (``qweight`` stays a transposed view when output-major)."""
        return self._map(lambda t: t.contiguous())

    def pin_memory(self) -> "Int4Weight":
        """Page-locked copies (CPU), same layout."""
        return self._map(lambda t: t.contiguous().pin_memory())

    def groups(self) -> torch.Tensor:
        """int64 [Kp]: the group of every (padded) input row."""
        kp = self.qweight.shape[0] * 8
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(kp, device=self.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The float matrix [K, N] in ``dtype``: ``(q - ((z_stored + 1) mod 16)) * scale`` (module docstring),
        computed in float32 and rounded once; either layout (output-major: computed as [N, K] and returned as
        its transposed view, the layout cuBLAS reads as well)."""
        if self.output_major:
            stored = self.storage                                      # [Np, Kp/8]
            shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=stored.device)
            q = ((stored.unsqueeze(-1) >> shifts) & 15).reshape(stored.shape[0], -1)       # [Np, Kp]
            z = ((unpack_cols(self.qzeros) + 1) & 15).t()              # [Np, G]
            g = self.groups()
            w = (q - z[:, g]).float() * self.scales.float().t()[:, g]
            K, N = self.shape
            return w[:N, :K].to(dtype).t()
        q = unpack_rows(self.qweight)                                  # [Kp, Np]
        z = (unpack_cols(self.qzeros) + 1) & 15                        # [G, Np]
        g = self.groups()
        w = (q - z[g]).float() * self.scales.float()[g]
        K, N = self.shape
        return w[:K, :N].to(dtype)

    def nbytes(self) -> int:
        ts = [self.qweight, self.qzeros, self.scales] + ([self.g_idx] if self.g_idx is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _rtn(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Round to nearest for groups wg [G, g, N] in the range [lo, hi] ([G, N], lo <= 0 <= hi): (scale rounded to
    float16 as stored, zero point 0..15, q int32 [G, g, N] 0..15), all float32 but q."""
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))   # below fp16's range
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, 15)
    return scale, zero, q


def quantize_i4(weight: torch.Tensor, group_size: int | None = None) -> Int4Weight:
    """Round-to-nearest int4 quantization of a float weight [K, N] (input × output) into the GPTQ layout.

    Args:
        weight: floating [K, N] on any device (the result stays there).
        group_size: input rows per group (default: ``group_size_for(Kp)``, 128 where it divides).
    Returns: an ``Int4Weight`` (scales in float16, zero points stored as z - 1, no g_idx).
    Raises:
        ShapeMismatchError: not 2-D, or a group size that does not divide K padded to a multiple of 8.
        UnsupportedDtypeError: not floating point.
    """
    if weight.dim() != 2:
        raise ShapeMismatchError(f"i4 quantization needs a 2-D weight, got shape {tuple(weight.shape)}",
                                 tensor="weight", expected="[K, N]", actual=tuple(weight.shape))
    if not weight.is_floating_point():
        raise UnsupportedDtypeError(f"i4 quantization needs a float weight, got {weight.dtype}",
                                    tensor="weight", expected="floating point", actual=str(weight.dtype))
    K, N = weight.shape
    kp, np_ = _up8(K), _up8(N)
    g = group_size or group_size_for(kp)
    if kp % g:
        raise ShapeMismatchError(f"group size {g} does not divide K = {kp}", tensor="weight",
                                 expected=f"K % {g} == 0", actual=kp)
    w = torch.zeros(kp, np_, dtype=torch.float32, device=weight.device)
    w[:K, :N] = weight.float()
    wg = w.view(kp // g, g, np_)
    lo0 = wg.amin(1).clamp(max=0)
    hi0 = wg.amax(1).clamp(min=0)
    best = None
    for shrink in SHRINKS:      # the clipping range with the least squared error, per group and column
        scale, zero, q = _rtn(wg, lo0 * shrink, hi0 * shrink)
        err = ((q - zero.unsqueeze(1)) * scale.unsqueeze(1) - wg).square().sum(1)        # [G, Np]
        if best is None:
            best = [err, scale, zero, q]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        best[2] = torch.where(better, zero, best[2])
        best[3] = torch.where(better.unsqueeze(1), q, best[3])
    _, scale, zero, q = best
    q = q.to(torch.int32)
    return Int4Weight(pack_rows(q.view(kp, np_)), pack_cols((zero.to(torch.int32) - 1) & 15),
                      scale.half(), None, g, (K, N))


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
              bits: int = 4, shape: tuple[int, int] | None = None, v2: bool = False) -> Int4Weight:
    """One Linear of a GPTQ checkpoint (``<name>.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``, AutoGPTQ "v1"
    zeros, 4 bits) as the packed weight the i4 format multiplies, without re-quantizing.

    The Linear computes ``y = x @ W`` with W [in_features, out_features] = [K, N] (``dequantize``). A ``g_idx``
    equal to ``arange(K) // group`` (no act-order) is dropped; another one is kept (the products honour it).

    Args:
        qweight: int32 [K/8, N]. qzeros: int32 [K/group, N/8]. scales: float16 (or another float) [K/group, N].
        g_idx: int32/int64 [K] or None. bits: must be 4. shape: the logical (K, N) when smaller than the packed
            one (default: the packed one). v2: the zeros are stored as z (GPTQModel's "gptq_v2" format); they are
            rewritten as z - 1 here.
    Raises:
        UnsupportedDtypeError: bits other than 4, integer tensors that are not int32, float scales missing.
        ShapeMismatchError: the shapes above do not fit together.
    """
    if bits != 4:
        raise UnsupportedDtypeError(f"only 4-bit GPTQ weights load as i4, got bits={bits}", tensor="bits",
                                    expected=4, actual=bits)
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise UnsupportedDtypeError(f"GPTQ {name} must be int32, got {t.dtype}", tensor=name,
                                        expected="int32", actual=str(t.dtype))
    if not scales.is_floating_point():
        raise UnsupportedDtypeError(f"GPTQ scales must be floating point, got {scales.dtype}", tensor="scales",
                                    expected="float16", actual=str(scales.dtype))
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ShapeMismatchError("GPTQ qweight, qzeros and scales must be 2-D", tensor="qweight",
                                 expected="2-D", actual=(tuple(qweight.shape), tuple(qzeros.shape), tuple(scales.shape)))
    kp, np_ = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != np_ or qzeros.shape != (groups, -(-np_ // 8)) or groups == 0 or kp % groups:
        raise ShapeMismatchError(f"GPTQ shapes do not fit: qweight {tuple(qweight.shape)}, qzeros "
                                 f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}", tensor="qzeros",
                                 expected=(groups, -(-np_ // 8)), actual=tuple(qzeros.shape))
    group = kp // groups
    if v2:
        qzeros = pack_cols((unpack_cols(qzeros) - 1) & 15)
    if np_ % 8:     # our products read whole words of zeros: pad the columns
        pad = _up8(np_) - np_
        qweight = torch.nn.functional.pad(qweight, (0, pad))
        scales = torch.nn.functional.pad(scales, (0, pad), value=1.0)
    if g_idx is not None:
        if g_idx.shape != (kp,):
            raise ShapeMismatchError(f"GPTQ g_idx must be [{kp}], got {tuple(g_idx.shape)}", tensor="g_idx",
                                     expected=(kp,), actual=tuple(g_idx.shape))
        trivial = torch.arange(kp, device=g_idx.device) // group
        g_idx = None if torch.equal(g_idx.to(torch.int64), trivial) else g_idx.to(torch.int32).contiguous()
    K, N = shape or (kp, np_)
    return Int4Weight(qweight.contiguous(), qzeros.contiguous(), scales.half().contiguous(), g_idx, group, (K, N))


def gptq_group_size(config: dict) -> int | None:
    """Check a GPTQ ``quantization_config`` (a Hugging Face ``config.json`` section) and return its group size
    (None for -1: one group over the whole input).

    Accepted: ``quant_method`` "gptq", ``bits`` 4, ``checkpoint_format`` "gptq" (v1 zeros, the default) or
    "gptq_v2" (pass ``v2=True`` to ``from_gptq``). ``desc_act`` (act-order) is served through ``g_idx``.

    Raises: UnsupportedDtypeError naming the field that is not supported.
    """
    method, bits = config.get("quant_method"), config.get("bits")
    fmt = config.get("checkpoint_format", "gptq")
    for name, value, ok in (("quant_method", method, method == "gptq"), ("bits", bits, bits == 4),
                            ("checkpoint_format", fmt, fmt in ("gptq", "gptq_v2"))):
        if not ok:
            raise UnsupportedDtypeError(f"quantization_config.{name} = {value!r} is not supported by the i4 format "
                                        "(4-bit GPTQ)", tensor=f"quantization_config.{name}",
                                        expected={"quant_method": "gptq", "bits": 4}.get(name, "gptq | gptq_v2"),
                                        actual=value)
    group = config.get("group_size", 128)
    return None if group in (-1, None) else int(group)


def gptq_linear(tensors, prefix: str, config: dict | None = None, shape: tuple[int, int] | None = None) -> Int4Weight:
    """The i4 weight of one GPTQ Linear from a checkpoint's tensors: ``<prefix>.qweight``, ``.qzeros``,
    ``.scales`` and, where present, ``.g_idx`` (a bias ``<prefix>.bias`` is the caller's). ``config``: the
    ``quantization_config`` (checked by ``gptq_group_size``; "gptq_v2" zeros are converted to v1).

    Raises: CheckpointError (a missing tensor), UnsupportedDtypeError, ShapeMismatchError (see ``from_gptq``).
    """
    from rwkv_chat.models.errors import CheckpointError

    missing = [f"{prefix}.{n}" for n in ("qweight", "qzeros", "scales") if f"{prefix}.{n}" not in tensors]
    if missing:
        raise CheckpointError(f"GPTQ weights missing: {missing}")
    if config is not None:
        gptq_group_size(config)
    v2 = config is not None and config.get("checkpoint_format") == "gptq_v2"
    return from_gptq(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"],
                     tensors.get(f"{prefix}.g_idx"), bits=int((config or {}).get("bits", 4)), shape=shape, v2=v2)


def concat_i4(parts: list[Int4Weight]) -> Int4Weight | None:
    """The i4 weights ``parts`` (each [K, N_i], one K) side by side along the outputs as one [K, sum N_i] weight
    (q, k, v of a GPTQ folder packed into one product), or None where they cannot be: an N_i not a multiple of 8
    (padded columns), other group sizes or padded K, or different ``g_idx`` (act-order permutations)."""
    first = parts[0]
    for q in parts:
        if q.shape[1] % 8 or q.qweight.shape[1] != q.shape[1] or q.shape[0] != first.shape[0] \
                or q.qweight.shape[0] != first.qweight.shape[0] or q.group_size != first.group_size \
                or q.scales.shape[0] != first.scales.shape[0] or (q.g_idx is None) != (first.g_idx is None) \
                or (q.g_idx is not None and not torch.equal(q.g_idx, first.g_idx)):
            return None
    joined = Int4Weight(torch.cat([q.qweight for q in parts], 1), torch.cat([q.qzeros for q in parts], 1),
                        torch.cat([q.scales for q in parts], 1), first.g_idx, first.group_size,
                        (first.shape[0], sum(q.shape[1] for q in parts)))
    return joined.with_layout(first.output_major)          # held as the parts were (output-major on CUDA)


def stack_i4(parts: list[Int4Weight]) -> list[Int4Weight] | None:
    """The same weights as views of one stack (per tensor: one [G, ...] allocation on their device, each part's
    words, zeros and scales its g-th slice, the layout kept), so that one launch can multiply each by its own x
    (``ops.gemv.i4_gemv_stack``: an RWKV-7 layer's r, k, v at decode batches); None where the parts differ in
    shape, layout, group, scale dtype or device, carry a g_idx, or are fewer than two. The parts' own tensors are not
    changed."""
    if len(parts) < 2:
        return None
    first = parts[0]
    if any(q.g_idx is not None or q.shape != first.shape or q.qweight.shape != first.qweight.shape
           or q.output_major != first.output_major or q.group_size != first.group_size
           or q.scales.dtype != first.scales.dtype or q.device != first.device for q in parts):
        return None
    stacks = [torch.stack([t.contiguous() for t in ts]) for ts in
              ([q.storage for q in parts], [q.qzeros for q in parts], [q.scales for q in parts])]
    return [Int4Weight(stacks[0][i].t() if first.output_major else stacks[0][i], stacks[1][i], stacks[2][i], None,
                       first.group_size, first.shape, first.output_major) for i in range(len(parts))]


def mm4_torch(x: torch.Tensor, q: Int4Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` in pure torch: x [..., K] -> [..., N] in x's dtype."""
    return x @ q.dequantize(x.dtype)


class I4Format(PackedFormat):
    """The ``WeightFormat`` of int4 weights in the GPTQ layout (strategy suffix ``i4``); ``nbytes``: qweight,
    qzeros, scales (and g_idx)."""

    suffix = "i4"
    packed_type = Int4Weight
    #: the dispatch product (``rwkv_chat.models.kernels.mm4``): a compiled / Triton GEMV on CUDA for few rows
    kernel = "mm4"
    torch_product = staticmethod(mm4_torch)

    def pack(self, weight: torch.Tensor, atype: torch.dtype, device: torch.device, stream: bool = False) -> Int4Weight:
        """``quantize_i4(weight)`` (weight [K, N], any float dtype and device) on ``device`` in the layout its
        kernels read (``prefers_output_major``), or, with ``stream``, in CPU memory (pinned where CUDA is
        available) in the layout of ``device``, for the layer's device to copy at use. Quantized on ``device``
        when it is CUDA (fast)."""
        src = weight.to(device) if torch.device(device).type == "cuda" and not stream else weight
        q = quantize_i4(src)
        if stream:
            q = q.to("cpu", output_major=prefers_output_major(device)).contiguous()
            return q.pin_memory() if torch.cuda.is_available() else q
        return place(q, device, stream)


FORMAT = I4Format()
