"""The RWKV-7 decode step of one token row through every layer in one persistent launch (``csrc/fused/v7_step.cu``):
a cooperative grid of one block per multiprocessor runs each layer's stages (ln1 + lerps + r/k/v and the first
low-rank products; per head the second low-rank products, the WKV-7 state step, group norm, bonus and gate; the output
product; ln2 + lerp + the channel-mix key; the value) with a grid-wide barrier between them, so a small model pays one
launch per step instead of about six per layer. The fused CUDA backend (``fused_cuda.FusedCuda``) holds one where
it serves (``PersistentStep.build``) and replaces its layer loop with it at one row; ln_out and the head stay as
they are.
"""

from __future__ import annotations

import torch

#: each layer's entries of the pointer table, in the order of ``V7StepSlot`` (csrc/fused/fused_launchers.h): the
#: model's parameter names, or the backend's own tensors ("mix6", "mixk", and the low-rank matrices it holds
#: output-major under the model's names)
SLOTS = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.w1", "att.a1", "att.g1", "att.v1",
         "att.w2", "att.a2", "att.g2", "att.v2", "att.output.weight", "ffn.key.weight", "ffn.value.weight",
         "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "mix6", "mixk", "att.w0", "att.a0", "att.k_k", "att.k_a",
         "att.v0", "att.r_k", "att.ln_x.weight", "att.ln_x.bias")
_MATRICES = SLOTS[:3] + SLOTS[11:14]           # held by the model, stored [K, N] with an output-major transpose
_LOW = ("att.w1", "att.a1", "att.g1", "att.v1", "att.w2", "att.a2", "att.g2", "att.v2")   # held by the backend
_LATER_ONLY = ("att.v1", "att.v2", "att.v0")   # not read in layer 0
#: V7StepArgs.prefetch by name: where each stage's weights are requested ahead of its grid barrier (nowhere, into L2,
#: the first chunk into registers) or streamed from (a ring of shared-memory tiles fed by bulk copies, sm_90+)
PREFETCH = ("plain", "l2", "registers", "ring")
#: the kernel's limits (csrc/fused/fused_launchers.h): layers, and the sum of the four low-rank widths
MAX_LAYERS = 64
MAX_LOW = 1024
HEAD_SIZE = 64
#: relative error of logits and states against the layer launches above which the load probe turns it off, per
#: activation dtype (bf16: 8 mantissa bits, the sums in another order)
PROBE_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _op():
    return getattr(torch.ops.rwkv_chat, "v7_step_cuda", None)


def _table_tensor(model, layers: list[dict], i: int, name: str) -> torch.Tensor | None:
    """Layer i's tensor of one slot as the kernel reads it (matrices output-major [M, K]), or None."""
    p, f = model.layers[i], layers[i]
    if name in _MATRICES:
        w = p[name]
        return w.t() if isinstance(w, torch.Tensor) else None
    if name in ("mix6", "mixk") or name in _LOW:
        return f.get(name)
    return p.get(name)


def _dims(layers: list[dict]) -> list[int]:
    """[dw, da, dg, dv]: the first layer's w1 / a1 / g1 widths and the second layer's v1 width (8 for a one-layer
    model, whose v1 the kernel never reads)."""
    return [layers[0][n].shape[0] for n in ("att.w1", "att.a1", "att.g1")] + [
        layers[1]["att.v1"].shape[0] if len(layers) > 1 else 8]


def _why_not(model, layers: list[dict], ffn: str) -> str | None:
    """None where the kernel takes the model, else why not."""
    spec = model.spec
    C, H, L = spec.n_embd, spec.n_head, model.n_layer
    if _op() is None:
        return "the kernels were built without v7_step"
    if ffn != "gemv":
        return f"the channel-mix value product is {ffn!r} (the persistent step reads the output-major matrix)"
    if spec.head_size != HEAD_SIZE or C != H * HEAD_SIZE or not 1 <= L <= MAX_LAYERS:
        return f"head size {spec.head_size}, {L} layers (it takes head size 64 and 1..{MAX_LAYERS} layers)"
    dev = model.layers[0]["ln1.weight"].device
    dt = model.layers[0]["ln1.weight"].dtype
    if dev.type != "cuda" or dt not in (torch.float16, torch.bfloat16) or model.emb.device != dev:
        return "needs every layer and the embedding on one CUDA device in fp16 / bf16"
    for i in range(L):
        for name in SLOTS:
            t = _table_tensor(model, layers, i, name)
            if t is None:
                if i == 0 and name in _LATER_ONLY:
                    continue
                return f"layer {i}: {name} is not a plain {dt} tensor on {dev}"
            want = torch.float32 if name == "att.w0" else dt
            if not (t.device == dev and t.dtype == want and t.is_contiguous() and t.data_ptr() % 16 == 0):
                return f"layer {i}: {name} is not a contiguous, 16-byte aligned {want} tensor on {dev}"
    dims = _dims(layers[:2])
    for i, f in enumerate(layers):
        if ([f[n].shape[0] for n in ("att.w1", "att.a1", "att.g1")] != dims[:3]
                or (i > 0 and f["att.v1"].shape[0] != dims[3])):
            return "the low-rank widths differ between layers"
    if any(x % 8 or x < 8 for x in dims) or sum(dims) > MAX_LOW:
        return f"low-rank widths {dims} (multiples of 8 summing to at most {MAX_LOW})"
    return None


class PersistentStep:
    """The persistent decode step of one model (built by ``build``): the per-layer pointer table, the scratch,
    the residual buffers and the grid barrier, all on the model's device.

    Attributes:
        prefetch: the index in ``PREFETCH`` (a benchmark switch): the next stage's weights requested before each
            grid barrier: 0 not (the default: the fastest measured, H100), 1 into L2 (prefetch.global.L2), 2 the
            first chunk of each warp's first rows into registers; 3 (compute capability 9.0+) every product's
            weights streamed through a ring of shared-memory tiles, each block's next tiles in flight across the
            barriers.
        blocks: the grid's blocks (0, the default: one per multiprocessor; a benchmark switch).
        grid: the blocks of the last launch (one per multiprocessor), 0 before the first.
    """

    def __init__(self, model, layers: list[dict]):
        spec = model.spec
        C, L = spec.n_embd, model.n_layer
        dev = model.layers[0]["ln1.weight"].device
        dt = model.layers[0]["ln1.weight"].dtype
        ptrs = []
        #: the tensors behind the table's pointers, kept alive as long as it is
        self.tensors = []
        for i in range(L):
            for name in SLOTS:
                t = _table_tensor(model, layers, i, name)
                ptrs.append(0 if t is None else t.data_ptr())
                self.tensors.append(t)
        #: [L, len(SLOTS)] int64 device pointers (the weights never move after load)
        self.table = torch.tensor(ptrs, dtype=torch.int64).view(L, len(SLOTS)).to(dev)
        self.dims = _dims(layers[:2])
        self.ffn = model.layers[0]["ffn.key.weight"].t().shape[0]
        self.H = spec.n_head
        self.x = torch.empty(1, C, dtype=dt, device=dev)
        self.dx = torch.empty(1, C, dtype=dt, device=dev)
        self.scratch = torch.empty(6 * C + MAX_LOW + self.ffn, dtype=dt, device=dev)
        #: the grid barrier's arrivals, their count at the end of the last launch, and the give-up flag
        self.bar = torch.zeros(3, dtype=torch.int32, device=dev)
        self.prefetch = 0
        #: the grid's blocks (0: one per multiprocessor, the most it takes; a benchmark switch)
        self.blocks = 0
        self.grid = 0

    @classmethod
    def build(cls, model, layers: list[dict], ffn: str) -> tuple[PersistentStep | None, str | None]:
        """(the step, None) where the kernel takes the model (``layers``: the backend's per-layer tensors; ``ffn``:
        its value-product mode), else (None, why not)."""
        why = _why_not(model, layers, ffn)
        return (None, why) if why else (cls(model, layers), None)

    def run(self, model, ids: torch.Tensor, state: list[torch.Tensor],
            times: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer of one decode step for ids long [1, 1]: updates ``state`` (flat att_x [1, C], s float32
        [1, H, 64, 64], ffn_x [1, C] per layer, contiguous) in place. Returns (x, dx) [1, C]: the last layer's
        residual stream and channel-mix output (the backend's buffers, overwritten by the next call), for ln_out.
        times (int64 [1 + 5 L] on the device, nullable): receives the GPU's global timer (ns) at the start and after
        each grid barrier."""
        torch.index_select(model.emb, 0, ids.view(-1), out=self.x)
        self.grid = _op()(self.table, state[0::3], state[1::3], state[2::3], self.x, self.dx, self.scratch, self.bar,
                          self.H, self.ffn, self.dims, self.prefetch, times, self.blocks)
        return self.x, self.dx

    def stage_times(self, model, state: list[torch.Tensor], steps: int = 20) -> list[float]:
        """Mean µs per layer of each stage (A ln1 + r/k/v + first low-rank, B heads, C output, D ln2 + key,
        E value; each up to its barrier's exit) over ``steps`` eager steps of one row from ``state`` (updated):
        a diagnostic (host syncs)."""
        L = model.n_layer
        times = torch.zeros(1 + 5 * L, dtype=torch.int64, device=self.x.device)
        ids = torch.ones(1, 1, dtype=torch.long, device=self.x.device)
        sums = [0.0] * 5
        for _ in range(steps):
            self.run(model, ids, state, times)
            d = times.diff().double().view(L, 5).mean(0).tolist()
            sums = [a + b / 1e3 for a, b in zip(sums, d)]
        return [v / steps for v in sums]

    def timed_out(self) -> bool:
        """Whether a barrier of a launch so far gave up waiting (a host sync; that launch's logits came out NaN)."""
        return bool(self.bar[2].item())


def probe(be, model) -> str | None:
    """None when the persistent step (``be.persistent``) agrees with the backend's layer launches from a random
    state at one row, twice in a row (logits and every state tensor within ``PROBE_TOL`` of the dtype, relative; the
    sums in another order) and no barrier timed out; else why not (with the error measured)."""
    spec, dev = model.spec, model.devices[0]
    dt = model.layers[0]["ln1.weight"].dtype
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    g = torch.Generator(device="cpu").manual_seed(0)
    tol = PROBE_TOL[dt]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    step, be.persistent = be.persistent, None
    try:
        with torch.no_grad():
            state = []
            for _ in range(model.n_layer):
                state += [(torch.randn(1, C, generator=g) * 0.5).to(dev, dt),
                          (torch.randn(1, H, N, N, generator=g) * 0.1).to(dev),
                          (torch.randn(1, C, generator=g) * 0.5).to(dev, dt)]
            other = [t.clone() for t in state]
            for t in range(2):
                ids = torch.tensor([[(97 * t + 11) % model.emb.shape[0]]], device=dev)
                be.persistent = None
                want = be.decode_step(model, ids, state)
                be.persistent = step
                got = be.decode_step(model, ids, other)
                if step.timed_out():
                    return "a grid barrier of the persistent step timed out"
                err = max([rel(got, want)] + [rel(x, y) for x, y in zip(other, state)])
                if not (torch.isfinite(got).all() and err <= tol):
                    return f"the persistent step differs from the layer launches (relative error {err:.2e} > {tol})"
    except Exception as e:  # noqa: BLE001 — the layer launches serve; the note says why
        return f"the persistent step: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        be.persistent = step
    return None
