"""A node-wide cap on the bytes of partly received tensors, so many streams cannot add up to an OOM.

Every stream's tensor reserves its full declared size when its first chunk arrives (after the shape
was checked) and gives it back when the tensor is complete or the stream ends. A declaration the
budget cannot hold is refused at once, before a byte of it is buffered.
"""

from __future__ import annotations

from common.tensor_codec import TensorError


class BufferFullError(TensorError):
    """The node already buffers as much as its cap allows (RESOURCE_EXHAUSTED, not the sender's fault alone)."""


class BufferBudget:
    """Bytes reserved by tensors being assembled on this node; used from one event loop."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_use = 0
        self.peak = 0  # highest ``in_use`` since the last :meth:`take_peak`

    def reserve(self, size: int) -> None:
        if self.in_use + size > self.limit_bytes:
            raise BufferFullError(f"the node already buffers {self.in_use} bytes of incoming tensors; "
                                  f"{size} more exceed its {self.limit_bytes}-byte cap")
        self.in_use += size
        self.peak = max(self.peak, self.in_use)

    def release(self, size: int) -> None:
        self.in_use = max(0, self.in_use - size)

    def take_peak(self) -> int:
        """The peak since the last call (then reset to the current use): large peaks merit a heap trim."""
        peak, self.peak = self.peak, self.in_use
        return peak
