"""What every writer of sealed versions shares: following new versions, atomic step directories.

A writer turns one leased snapshot into files under ``OUT/step-NNNNNNNN``. It writes into a
temporary directory, fsyncs, and renames, so an interrupted write never leaves a directory that
looks complete; ``OUT/latest`` then points at the newest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Iterator

from stager.protocol import ErrorCode, StagerError

log = logging.getLogger("stager.persist")
_STEP_DIR = re.compile(r"step-\d{8}")


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
    """Yield a temporary directory; on success fsync it and rename it to ``out_dir/step-N``
    (replacing an earlier export of that step) and point ``out_dir/latest`` at it."""
    final = os.path.join(out_dir, f"step-{step:08d}")
    tmp = os.path.join(out_dir, f".step-{step:08d}.partial-{os.getpid()}")
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(final):  # re-export of a step: swap, then drop the old copy
            old = final + f".old-{os.getpid()}"
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


def prune(out_dir: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(out_dir) if _STEP_DIR.fullmatch(d))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


def for_each_version(write: Callable[[Any], str], out_dir: str, *, endpoint: str | None = None,
                     step: int | None = None, follow: bool = False, every: int = 1, keep: int | None = None,
                     max_writes: int | None = None, poll: float = 1.0) -> list[str]:
    """Lease the version ``step`` (default: the newest) and ``write`` it, or with ``follow`` each
    new version at least ``every`` steps after the last one written, until interrupted (or
    ``max_writes``); the ``keep`` newest step directories stay."""
    from stager.client import Subscriber

    written: list[str] = []
    last = -1
    with Subscriber(endpoint) as sub:
        while True:
            try:
                snap = sub.at(step) if step is not None else sub.latest()
            except StagerError as exc:
                if not follow or exc.code != ErrorCode.NO_VERSION:
                    raise
                time.sleep(poll)
                continue
            with snap:
                if snap.step > last and (last < 0 or snap.step - last >= every):
                    written.append(write(snap))
                    last = snap.step
                    if keep:
                        prune(out_dir, keep)
            if not follow or (max_writes is not None and len(written) >= max_writes):
                return written
            time.sleep(poll)
