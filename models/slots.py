"""The slot bookkeeping shared by the batched decoders of every family (``rwkv.decode.BatchDecoder``,
``qwen2.decode``): conversations sit in slots ``[0, size)`` of static buffers, each known to its caller by a
handle (an int never reused); a step runs at a batch-size bucket, the smallest of ``buckets`` >= the live
slots, so that one CUDA graph per bucket serves every batch size.

A decoder subclasses :class:`Slots`, calls ``Slots.__init__(self, max_batch, buckets)``, sets ``model`` (a
model of the ``Model`` interface: ``zero_state``, ``place_state``) and copies its own tensors in ``add`` /
``remove``; the handle <-> slot map lives here. :class:`StepInputs` stages a step's small inputs (token ids,
lengths) for the device.
"""

from __future__ import annotations

from rwkv_chat.models.errors import StateError


def bucket_sizes(buckets, max_batch: int) -> tuple[int, ...]:
    """The sorted batch sizes of ``buckets`` below ``max_batch``, then ``max_batch`` itself."""
    return tuple(sorted(b for b in buckets if b < max_batch)) + (max_batch,)


class Slots:
    """Handle <-> slot map of a batched decoder (see the module docstring).

    Attributes:
        max_batch: slots. buckets: ``bucket_sizes(buckets, max_batch)``.
    """

    def __init__(self, max_batch: int, buckets) -> None:
        self.max_batch = max_batch
        self.buckets = bucket_sizes(buckets, max_batch)
        self._handle_at: list[int] = []          # slot -> handle, for live slots [0, size)
        self._meta: dict[int, dict] = {}         # handle -> the state's metadata
        self._next = 0

    @property
    def size(self) -> int:
        """Live conversations."""
        return len(self._handle_at)

    def handles(self) -> list[int]:
        return list(self._handle_at)

    def bucket(self, n: int) -> int:
        """The batch size a step over ``n`` live slots runs at (the smallest bucket >= n)."""
        return next(b for b in self.buckets if b >= n)

    def _joining(self, state):
        """The state a conversation joins with (``add``): ``state`` placed on ``self.model`` (its empty one for
        None). Raises StateError: no free slot, a state of another model, or a batched state."""
        if self.size >= self.max_batch:
            raise StateError(f"all {self.max_batch} decode slots are in use")
        state = self.model.zero_state() if state is None else self.model.place_state(state)
        if state.batch_size != 1:
            raise StateError(f"add takes a state of batch 1, got {state.batch_size}")
        return state

    def _new_handle(self, metadata) -> int:
        """Give the slot ``size`` (already filled by the caller) a new handle holding a copy of ``metadata``."""
        h = self._next
        self._next += 1
        self._handle_at.append(h)
        self._meta[h] = dict(metadata)
        return h

    def _free(self, handle: int, slot: int, last: int) -> None:
        """Forget ``handle`` (at ``slot``), whose slot got the contents of the ``last`` one (the caller copied)."""
        if slot != last:
            self._handle_at[slot] = self._handle_at[last]
        self._handle_at.pop()
        del self._meta[handle]

    def _slot(self, handle: int) -> int:
        try:
            return self._handle_at.index(handle)
        except ValueError:
            raise StateError(f"no live conversation with handle {handle}") from None


class StepInputs:
    """A step's small integer inputs on their way to the device: written into a host tensor (pinned where the
    device is CUDA), copied asynchronously, so the host prepares the next step while the GPU runs this one.

    ``host()`` returns the host tensor once the previous copy out of it has run (the host may run ahead of the GPU
    by one step, never rewrite what is still to be copied); ``send(rows)`` copies its first ``rows`` (all by
    default) into ``device`` on the current stream of ``device``'s GPU, where an event marks the copy.

    Args:
        device: the device tensor the inputs go to (any shape; its first dimension is the rows of ``send``).
    """

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self._host = torch.zeros_like(device, device="cpu").pin_memory() if device.is_cuda else \
            torch.zeros_like(device, device="cpu")
        self._copied = torch.cuda.Event() if device.is_cuda else None
        self._pending = False

    def host(self):
        """The host tensor, free to be written."""
        if self._pending:
            self._copied.synchronize()
            self._pending = False
        return self._host

    def send(self, rows: int | None = None) -> None:
        """Copy the host tensor's first ``rows`` (all: None) to the device tensor."""
        import torch

        dst, src = (self.device, self._host) if rows is None else (self.device[:rows], self._host[:rows])
        dst.copy_(src, non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device.device))
            self._pending = True
