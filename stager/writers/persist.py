"""What every writer of sealed versions shares: following new versions, atomic step directories.

A writer turns one leased snapshot into files under ``OUT/step-NNNNNNNN``. It writes into a
temporary directory, fsyncs, and renames, so an interrupted write never leaves a directory that
looks complete; ``OUT/latest`` then points at the newest.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from stager.protocol import StagerError

log = logging.getLogger("stager.writers.persist")
_STEP_DIR = re.compile(r"step-(\d{8,})")  # zero-padded to 8 digits, wider past 10**8


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` over a storage of exactly its bytes (same memory, no copy). A view of a snapshot
    segment has the whole segment as its storage, and DCP's writer clones any tensor whose storage
    is larger than the tensor (so torch.save writes it alone): this spares DCP that copy.

    The result carries nothing of stager: ``t`` (its mapping or frame) is kept alive by the buffer
    the new storage is made from, never by an attribute of the tensor, because torch.save pickles a
    tensor's ``__dict__``: an attribute holding ``t`` wrote the whole segment into the file again and
    kept it alive in every tensor loaded from it."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or t.untyped_storage().nbytes() == nbytes:
        return t
    # torch.save writes a view's whole storage, even a view of no bytes or a strided one: those
    # become tensors of their own (nothing, or a copy of just their bytes: never a segment's view)
    if nbytes == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    if not t.is_contiguous():
        return t.contiguous()
    buffer = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    buffer.owner = t  # the memory is t's; torch.frombuffer keeps the buffer (so t) alive as long as the storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only mapping: DCP only reads it
        return torch.frombuffer(buffer, dtype=t.dtype).view(t.shape)


def step_dirname(step: int) -> str:
    """The directory name of ``step``'s export: ``step-00000042`` (sorts by name up to 10**8).

    >>> step_dirname(42), step_of_dirname("step-123456789"), step_of_dirname("latest")
    ('step-00000042', 123456789, None)
    """
    return f"step-{step:08d}"


def step_of_dirname(name: str) -> int | None:
    """The step a directory name stands for, None when it is not a step directory."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def step_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, step_dirname(step))


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


@contextlib.contextmanager
def step_directory(out_dir: str, step: int) -> Iterator[str]:
    """Yield a temporary directory; on success fsync it and :func:`publish_step` it."""
    tmp = os.path.join(out_dir, f".{step_dirname(step)}.partial-{os.getpid()}")
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_step(tmp, out_dir, step)


def publish_step(tmp: str, out_dir: str, step: int) -> str:
    """Rename the complete, fsynced directory ``tmp`` to ``out_dir/step-N`` (replacing an earlier
    write of that step: swapped, then dropped) and point ``out_dir/latest`` at it."""
    final = step_path(out_dir, step)
    try:
        if os.path.exists(final):  # re-export of a step: swap, then drop the old copy
            old = os.path.join(out_dir, f".{step_dirname(step)}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link, tmp_link = os.path.join(out_dir, "latest"), os.path.join(out_dir, f".latest-{os.getpid()}")
    try:
        os.symlink(os.path.basename(final), tmp_link)
        os.replace(tmp_link, link)  # atomic switch
    except OSError as exc:
        log.warning("could not update %s: %s", link, exc)
    return final


# what a writer leaves when killed mid-write (partial), mid-swap (old) or mid-prune (pruned)
_TEMPORARY = re.compile(r"\.step-\d{8,}\.(?:partial|old|pruned)-(\d+)|\.latest-(\d+)")


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Remove the temporaries (``.step-N.partial-<pid>``, ``.step-N.old-<pid>``, ``.step-N.pruned-<pid>``,
    ``.latest-<pid>``) of writers that were killed mid-write: only those whose pid is dead on this host,
    never a live writer's. Returns
    the names removed. (Writers on other hosts sharing ``out_dir`` have pids this host cannot see:
    give each host its own output directory.)"""
    import psutil

    removed = []
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or psutil.pid_exists(pid):
            continue
        path = os.path.join(out_dir, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:  # another writer removed it first
            continue
        except OSError as exc:
            log.warning("could not remove %s, left by a killed writer (pid %d): %s", path, pid, exc)
            continue
        removed.append(name)
    if removed:
        log.info("removed %d temporaries of killed writers in %s: %s", len(removed), out_dir, ", ".join(removed))
    return removed


def prune(out_dir: str, keep: int) -> None:
    """Remove all but the ``keep`` newest step directories (by step number, not by name)."""
    steps = sorted((step, d) for d in os.listdir(out_dir) if (step := step_of_dirname(d)) is not None)
    for _, old in steps[:-keep]:
        # renamed first: a directory named step-N is complete or absent, never half deleted
        doomed = os.path.join(out_dir, f".{old}.pruned-{os.getpid()}")
        try:
            os.rename(os.path.join(out_dir, old), doomed)
        except FileNotFoundError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def failure_cause(exc: BaseException) -> str:
    """One line saying why a version was not written: a typed error's own text; any other exception
    (a bug, or a library's error) with its type, since its text alone may not say what it is.

    >>> failure_cause(KeyError("head_dim"))
    "KeyError: 'head_dim'"
    """
    text = str(exc) if isinstance(exc, StagerError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def for_each_version(
    write: Callable[[Any], str],
    out_dir: str,
    *,
    endpoint: str | None = None,
    step: int | None = None,
    follow: bool = False,
    every: int = 1,
    keep: int | None = None,
    max_writes: int | None = None,
    on_written: Callable[[str], None] | None = None,
    on_report: Callable[[dict], None] | None = None,
) -> list[str]:
    """Lease the version ``step`` (default: the newest) and ``write`` it; or, with ``follow``, each
    new version at least ``every`` steps after the last one written, woken by the daemon's
    announcements (no polling), until interrupted or ``max_writes`` were written. The ``keep``
    newest step directories stay. A follower that cannot write one version, whatever the failure
    (bad metadata, a full disk, a bug), logs one line naming the step and why (the traceback at
    DEBUG) and goes on with the next one. ``on_written(path)`` is called after each
    write (a follower's CLI prints each path as it is done). ``on_report`` gets ``{"step", "path",
    "seconds"}`` per version written and ``{"step", "error", "seconds"}`` per one that was not (metrics)."""
    report = on_report or (lambda r: None)
    from stager.client import Subscriber

    if every < 1:
        raise ValueError(f"every must be >= 1, not {every}")
    written: list[str] = []
    with Subscriber(endpoint) as sub:
        if not follow:
            with sub.at(step) if step is not None else sub.latest() as snap:
                started = time.monotonic()
                written.append(write(snap))
                report({"step": snap.step, "path": written[-1], "seconds": time.monotonic() - started})
            if on_written is not None:
                on_written(written[-1])
            if keep:
                prune(out_dir, keep)
            return written
        last: int | None = None
        while max_writes is None or len(written) < max_writes:
            floor = -1 if last is None else last + every - 1
            with sub.wait_for_newer(floor) as snap:
                last = snap.step  # also when it fails: a bad version is not retried forever
                started = time.monotonic()
                try:
                    written.append(write(snap))
                except Exception as exc:  # whatever one version did (^C and exit still stop the follower)
                    cause = failure_cause(exc)
                    # one line at the default level; the traceback only when debugging
                    log.error(
                        "step %d was not written: %s; waiting for the next version",
                        snap.step,
                        cause,
                        exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
                    )
                    report({"step": snap.step, "error": cause, "seconds": time.monotonic() - started})
                    continue
                report({"step": snap.step, "path": written[-1], "seconds": time.monotonic() - started})
            if keep:
                prune(out_dir, keep)
            if on_written is not None:
                on_written(written[-1])
    return written
