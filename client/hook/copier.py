"""Device-to-host copies into snapshot segments.

CPU tensors are copied with ``copy_`` on the staging thread. CUDA tensors are copied with
``non_blocking=True`` on a side stream that first waits for an event recorded on the
trainer's stream at ``stage()`` time; the destination is the shared-memory segment itself,
page-locked once per segment with ``cudaHostRegister`` so the copy is a true async DMA and
no intermediate pinned buffer (and no second host copy) is needed.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("stager.client")

_libc = ctypes.CDLL(None, use_errno=True)
try:
    # streaming stores: 1.5-1.7x Tensor.copy_ with two ranks writing shared memory (client/_streamcopy.c)
    from stager.client.hook._streamcopy import stream_copy as _bulk_copy
except ImportError:  # built without a C compiler: glibc's memcpy (ctypes drops the GIL during the call)
    _bulk_copy = _libc.memcpy
    _bulk_copy.restype = ctypes.c_void_p
    _bulk_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
BULK_BYTES = 1 << 20  # below this, one foreach call for all tensors beats a call per tensor


def _raw_copyable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """True when src's bytes are exactly dst's bytes: plain, dense, same dtype, no lazy conj/neg."""
    return (
        dst.dtype == src.dtype
        and dst.is_contiguous()
        and src.is_contiguous()
        and not src.is_conj()
        and not src.is_neg()
        and src.device.type == "cpu"
    )


def host_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy CPU ``srcs`` into ``dsts``: streaming copies for large dense tensors, one foreach call for the rest."""
    rest_d, rest_s = [], []
    for dst, src in zip(dsts, srcs):
        nbytes = dst.numel() * dst.element_size()
        if nbytes >= BULK_BYTES and _raw_copyable(dst, src):
            _bulk_copy(dst.data_ptr(), src.data_ptr(), nbytes)
        else:
            rest_d.append(dst)
            rest_s.append(src)
    if rest_d:
        with torch.no_grad():  # parameters require grad; the copies must not enter autograd
            torch._foreach_copy_(rest_d, rest_s)


def cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class CopyEngine:
    """Issues the copies of one rank; owns the side streams and the host registrations.

    Runs on the client's worker thread, whose current CUDA device is not the trainer's: every
    CUDA call here names its device explicitly (one side stream per source device).
    """

    def __init__(self) -> None:
        self._streams: dict[int, object] = {}  # device index -> side stream
        self._registered: dict[int, int] = {}  # data_ptr -> nbytes registered with CUDA
        self.device: int | None = None  # the trainer's device (set by the client at stage())

    @property
    def pinned(self) -> int:
        """How many segment mappings are page-locked now (0: device copies are synchronous)."""
        return len(self._registered)

    def register(self, host: torch.Tensor) -> None:
        """Page-lock a segment mapping once so D2H copies into it run asynchronously."""
        if self.device is None or not cuda_active() or host.data_ptr() in self._registered:
            return
        with torch.cuda.device(self.device):
            # cudaHostRegisterPortable (1): pinned for every device, not only the current one
            rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 1)
        if int(rc) != 0:
            log.warning("cudaHostRegister failed (%s); device copies into this segment will be synchronous", rc)
            return
        self._registered[host.data_ptr()] = host.numel()

    def unregister(self, host: torch.Tensor) -> None:
        if self._registered.pop(host.data_ptr(), None) is not None:
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], start_event) -> list:
        """Copy every ``(dst, src)``; returns the CUDA events that complete with the device copies."""
        host_dst = []
        host_src = []
        by_device = {}
        for dst, src in pairs:
            if src.is_cuda:
                by_device.setdefault(src.device.index, []).append((dst, src))
            else:
                host_dst.append(dst)
                host_src.append(src)
        if host_dst:
            host_copy(host_dst, host_src)
        events = []
        with torch.no_grad():
            for index, device_pairs in by_device.items():
                events.append(self._copy_device(index, device_pairs, start_event))
        return events

    def _copy_device(self, index: int, device_pairs: list, start_event) -> object:
        with torch.cuda.device(index):
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)
            with torch.cuda.stream(stream):
                if start_event is not None and start_event.device.index == index:
                    stream.wait_event(start_event)  # the values as of stage(), not earlier
                else:  # tensors on another device than the trainer's: order after its current work
                    stream.wait_stream(torch.cuda.current_stream(index))
                for dst, src in device_pairs:
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(stream)  # the allocator must not reuse src before the copy ran
                done = torch.cuda.Event()
                done.record(stream)
        return done

    def close(self) -> None:
        for ptr in list(self._registered):
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()
