"""Device-to-host copies into snapshot segments.

CPU tensors are copied with ``copy_`` on the staging thread. CUDA tensors are copied with
``non_blocking=True`` on a side stream that first waits for an event recorded on the
trainer's stream at ``stage()`` time; the destination is the shared-memory segment itself,
page-locked once per segment with ``cudaHostRegister`` so the copy is a true async DMA and
no intermediate pinned buffer (and no second host copy) is needed.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("stager.client")


def cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class CopyEngine:
    """Issues the copies of one rank; owns the side stream and the host registrations."""

    def __init__(self) -> None:
        self._stream = None
        self._registered: dict[int, int] = {}  # data_ptr -> nbytes registered with CUDA

    def register(self, host: torch.Tensor) -> None:
        """Page-lock a segment mapping once so D2H copies into it run asynchronously."""
        if not cuda_active() or host.data_ptr() in self._registered:
            return
        rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
        if int(rc) != 0:
            log.warning("cudaHostRegister failed (%s); device copies into this segment will be synchronous", rc)
            return
        self._registered[host.data_ptr()] = host.numel()

    def unregister(self, host: torch.Tensor) -> None:
        if self._registered.pop(host.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], start_event) -> object | None:
        """Copy every ``(dst, src)``; returns a CUDA event that completes with the device copies (or None)."""
        host_dst, host_src, device_pairs = [], [], []
        for dst, src in pairs:
            if src.is_cuda:
                device_pairs.append((dst, src))
            else:
                host_dst.append(dst)
                host_src.append(src)
        with torch.no_grad():  # parameters require grad; the copies must not enter autograd
            if host_dst:
                torch._foreach_copy_(host_dst, host_src)  # one call: no per-tensor Python overhead
            if device_pairs:
                return self._copy_device(device_pairs, start_event)
        return None

    def _copy_device(self, device_pairs: list, start_event) -> object:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        with torch.cuda.stream(stream):
            if start_event is not None:
                stream.wait_event(start_event)  # the values as of stage(), not earlier
            for dst, src in device_pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)  # the allocator must not reuse src before the copy ran
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def close(self) -> None:
        for ptr in list(self._registered):
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()
