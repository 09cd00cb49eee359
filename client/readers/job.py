"""Reading a multi-node job: complete versions assembled from every node's daemon.

A reader pointed at any daemon of a job learns the membership from it (``JobInfo``), asks every
node which steps it holds (in parallel), and leases the newest step that every answering node
sealed and none failed. Each region is then read from the node that holds it, the reader's own
node first (zero-copy through shared memory when the reader runs there), requests to several
nodes in flight at once; a region several nodes hold (HSDP replicas across nodes) is read once.
A node that dies or stops answering fails the read with :class:`~stager.protocol.NodeDown`
naming it, within the reader's timeout; the next acquire falls back to the newest version the
other nodes can still complete (replicated regions), or says which node it lacks.

Where an RDMA engine (NIXL, Mooncake's transfer engine) would plug in: a node's byte source
(:class:`~.sources.RemoteSource`: ``read_requests`` / ``send_read`` / ``recv_read``) is the only
thing that moves bytes between hosts; :class:`JobSource` never looks inside it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterable, Iterator

import torch

from stager.protocol import (
    Acquire, AcquireReply, Box, ErrorCode, NodeDown, Release, StagerError, Subscribe, SubscribeReply,
)
from stager.protocol.job import JobInfo, JobInfoReply
from stager.protocol.layout import check_box, narrow_box
from stager.protocol.reads import Announce

from ..connection import Connection
from .assembly import MergedTensor, complete_steps, incomplete_reason, intersect, merge_layouts
from .sources import WINDOW

log = logging.getLogger("stager.client")
DOWN = (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.NODE_DOWN)
ATTEMPTS = 3  # complete steps tried newest first when retention drops one between asking and leasing


class JobReader:
    """One reader's connections to every daemon of a job (its own daemon's included)."""

    def __init__(self, primary: Connection, info: JobInfoReply, timeout: float,
                 make_source: Callable[[AcquireReply, Connection], Any] | None, role: str = "reader"):
        self.primary, self.node, self.job = primary, info.node, info.job
        self.nodes = dict(info.nodes)  # node id -> endpoint
        self.timeout, self._make_source = timeout, make_source  # make_source None: leases only (readable())
        self.conns = {n: primary if n == info.node else Connection(e, role=role) for n, e in self.nodes.items()}
        self.newest: dict[str, int] = {}  # node -> newest step it announced (or held when subscribing)
        self.last: dict[str, JobInfoReply] = {}  # node -> its last answer: a node that went silent counts with it
        self.up: set[str] = set()  # nodes subscribed to in their daemon's current session
        self._subscribed: dict[str, tuple | None] = {}  # node -> the connection's registration subscribed in
        # announcements may arrive while any request waits for its reply: every connection notes them
        for node, conn in self.conns.items():
            if conn is not primary:
                conn.on_unsolicited = functools.partial(self._note, node)
        self._primary_handler = primary.on_unsolicited
        primary.on_unsolicited = self._on_primary

    def _note(self, node: str, msg: Any) -> None:
        if isinstance(msg, Announce):
            self.newest[node] = max(self.newest.get(node, -1), msg.step)

    def _on_primary(self, msg: Any) -> None:
        self._note(self.node, msg)
        self._primary_handler(msg)

    def same_membership(self, info: JobInfoReply) -> bool:
        return (info.job, info.node, info.nodes) == (self.job, self.node, self.nodes)

    def _down(self, node: str, exc: StagerError, doing: str) -> NodeDown:
        if isinstance(exc, NodeDown):
            return exc
        return NodeDown(node, f"node {node} ({self.nodes[node]}) of job {self.job} did not answer while {doing}: "
                              f"{exc.message}. Its daemon died, hangs or is unreachable; a version it holds part "
                              "of cannot be read until it is back (or from nodes holding replicas)")

    def _ask_all(self, make: Callable[[str], Any], what: str, nodes: Iterable[str], expect=None
                 ) -> tuple[dict[str, Any], dict[str, StagerError]]:
        """Send ``make(node)`` to every node in ``nodes`` first, then collect the replies:
        ``(replies, errors)`` by node."""
        sent, errors, replies = {}, {}, {}
        for node in nodes:
            conn = self.conns[node]
            try:
                if conn.session is None:
                    conn.hello(self.timeout)
                sent[node] = conn.send(make(node))
            except StagerError as exc:
                errors[node] = exc
        for node, rid in sent.items():
            try:
                replies[node] = self.conns[node].wait_reply(rid, self.timeout, what, expect)
            except StagerError as exc:
                errors[node] = exc
        return replies, errors

    def states(self) -> tuple[dict[str, JobInfoReply], dict[str, str]]:
        """Every node's JobInfoReply, asked in parallel, and the nodes that did not answer (why)."""
        replies, errors = self._ask_all(lambda n: JobInfo(members=False), "job_info", self.nodes, JobInfoReply)
        for node, reply in list(replies.items()):
            if reply.node != node:  # e.g. an ipc path that names another daemon on this host
                del replies[node]
                errors[node] = StagerError(ErrorCode.UNAVAILABLE, f"{self.nodes[node]} answered as node "
                                                                  f"{reply.node!r}, not {node!r}: ipc endpoints are "
                                                                  "per host; serve tcp and --advertise it")
        moved = {n: r.job for n, r in replies.items() if r.job != self.job}
        if moved:
            raise MembershipChanged(ErrorCode.NO_VERSION, f"nodes {sorted(moved)} now belong to job "
                                                          f"{next(iter(moved.values()))!r}, not {self.job!r}: "
                                                          "the job changed; ask again")
        down = {}
        for node, exc in errors.items():
            if exc.code not in DOWN and node == self.node:
                raise exc
            down[node] = exc.message  # another node that answers with an error is as good as down
        self.last.update(replies)
        return replies, down

    def acquire(self, step: int | None) -> tuple[AcquireReply, "JobSource"]:
        """Lease ``step`` (None: the newest complete one) on every node that holds part of it:
        the merged reply (the primary's lease, every tensor whole) and the source reading it."""
        states, down = self.states()
        if self.node in down:
            raise self._down(self.node, StagerError(ErrorCode.UNAVAILABLE, down[self.node]), "asked for its steps")
        complete, kinds = self.known_complete(states)
        if step is not None:
            if step not in complete:
                raise StagerError(ErrorCode.NO_VERSION, f"step {step} of job {self.job} is not complete: "
                                                        f"{incomplete_reason(step, kinds, down)}")
            candidates = [step]
        else:
            candidates = complete[::-1][:ATTEMPTS + len(down) * ATTEMPTS]
            if not candidates:
                newest = max((s for r in states.values() for s in r.sealed), default=None)
                why = "" if newest is None else f" (newest step anywhere: {newest}: " \
                                                f"{incomplete_reason(newest, kinds, down)})"
                raise StagerError(ErrorCode.NO_VERSION, f"no step of job {self.job} is sealed on every node yet{why}")
        first: StagerError | None = None
        for s in candidates:
            try:
                return self._lease(s, [n for n in states if n not in down], down)
            except StagerError as exc:
                # retention dropped it meanwhile, or it needs a node that is down: the next older
                # complete step (with replicas of the down node's regions elsewhere, one may be)
                if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN) or step is not None:
                    raise
                first = first or exc
        raise first  # type: ignore[misc]

    def known_complete(self, states: dict[str, JobInfoReply]) -> tuple[list[int], dict[str, dict[str, list[int]]]]:
        """The steps known complete, oldest first, and what each node is known to hold: ``states``
        (the nodes that answered now), a node that does not answer counting with what it said last
        (:attr:`last`; nothing, if it never answered). A step it did not say it sealed, or said it
        failed, is never complete."""
        known = {n: states.get(n) or self.last.get(n) for n in self.nodes}
        sealed = {n: r.sealed if r else [] for n, r in known.items()}
        failed = {n: r.failed for n, r in known.items() if r}
        kinds = {n: {"sealed": r.sealed, "staging": r.staging, "failed": r.failed} for n, r in known.items() if r}
        return complete_steps(sealed, failed), kinds

    def readable(self, steps: Iterable[int], states: dict[str, JobInfoReply], down: dict[str, str]) -> list[int]:
        """Of ``steps``, those a reader can lease now: every region held by a node that answers (the
        lease :meth:`acquire` tries before it falls back to an older step; released at once)."""
        out = []
        for step in steps:
            try:
                reply, source = self._lease(step, [n for n in states if n not in down], dict(down))
            except StagerError as exc:
                if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN, ErrorCode.PARTIAL):
                    raise
                continue  # gone meanwhile, or a region only a silent node holds
            source.close()
            _release({self.node: (self.primary, reply.lease)})
            out.append(step)
        return out

    def _order(self, nodes: list[str]) -> list[str]:
        """Nodes to read from, nearest first: on the reader's own host, then its daemon, then the rest."""
        return sorted(nodes, key=lambda n: (not self.conns[n].same_host, n != self.node, list(self.nodes).index(n)))

    def _lease(self, step: int, nodes: list[str], down: dict[str, str]) -> tuple[AcquireReply, "JobSource"]:
        replies, errors = self._ask_all(lambda n: Acquire(step=step), f"acquire of step {step}", nodes, AcquireReply)
        leases = {n: (self.conns[n], r.lease) for n, r in replies.items()}
        try:
            for node, exc in errors.items():
                if exc.code not in DOWN:
                    raise exc
                down[node] = exc.message
            if self.node in down:
                raise self._down(self.node, StagerError(ErrorCode.UNAVAILABLE, down[self.node]), f"leasing {step}")
            try:
                merged = merge_layouts({n: replies[n].tensors for n in replies}, self._order(list(replies)), step)
            except StagerError as exc:
                if exc.code == ErrorCode.PARTIAL and down:
                    node = next(iter(down))
                    raise NodeDown(node, f"step {step} of job {self.job} needs a node that does not answer ("
                                         f"{', '.join(f'node {n}: {why}' for n, why in down.items())}); "
                                         f"{exc.message}") from None
                raise
            make = self._make_source
            sources = {n: make(r, self.conns[n]) for n, r in replies.items()} if make is not None else {}
        except BaseException:
            _release(leases)
            raise
        primary = replies[self.node]
        objects, quant = {}, {}
        for node in self.nodes:  # the first node's (global rank 0's) train state wins, as on one node
            if node in replies:
                for k, v in replies[node].objects.items():
                    objects.setdefault(k, v)
                quant.update(replies[node].quant)
        reply = dataclasses.replace(primary, tensors=tuple(m.layout() for m in merged.values()), objects=objects,
                                    quant=quant, partial=False)
        reply.id = primary.id
        del leases[self.node]  # the primary's lease is the snapshot's: its subscriber releases it
        return reply, JobSource(self, step, merged, sources, leases)

    # ------------------------------------------------------------------ announcements

    def subscribe(self) -> None:
        """Subscribe on every node not subscribed in its daemon's current session (a restarted
        daemon starts a new one: its announcements so far are forgotten); :attr:`up` says which
        nodes are subscribed now."""
        for conn in self.conns.values():
            conn.poll_monitor(0)  # a lost connection ends its session: subscribe again below
        todo = [n for n, c in self.conns.items() if c.session is None or self._subscribed.get(n) != c.registration]
        replies, errors = self._ask_all(lambda n: Subscribe(), "subscribe", todo, SubscribeReply)
        for node, reply in replies.items():
            self._subscribed[node] = self.conns[node].registration
            self.up.add(node)
            self.newest.pop(node, None)
            if reply.step is not None:
                self.newest[node] = reply.step
        for node, exc in errors.items():
            if exc.code not in DOWN:
                raise exc
            self.up.discard(node)
            log.debug("subscribe to node %s failed: %s", node, exc)

    def newest_complete_hint(self) -> int | None:
        """The newest step every answering node announced (None: one of them announced nothing
        yet, or none answers): no newer version can be complete (a silent node counts with its
        last answer, see :meth:`acquire`)."""
        if not self.up or not self.up <= set(self.newest):
            return None
        return min(self.newest[n] for n in self.up)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for announcements from any node."""
        for conn, msg in Connection.recv_any([c for c in self.conns.values() if c.sock is not None], timeout):
            conn.on_unsolicited(msg)

    def close(self) -> None:
        self.primary.on_unsolicited = self._primary_handler
        for node, conn in self.conns.items():
            if conn is not self.primary:
                conn.close()


class MembershipChanged(StagerError):
    """A node of the job a reader knew now belongs to another job: ask for the membership again."""


def _release(leases: dict[str, tuple[Connection, int]]) -> None:
    for conn, lease in leases.values():
        try:
            conn.request(Release(lease=lease), 2.0)
        except Exception as exc:  # a closed or dead connection: the daemon ends its leases itself
            log.debug("release of lease %d failed: %s", lease, exc)
    leases.clear()


class _WholeRegions:
    """``regions[fqn]`` of a job version: every tensor is whole."""

    def __init__(self, source: "JobSource"):
        self._source = source

    def __getitem__(self, fqn: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        t = self._source.full(fqn)
        return [((0,) * t.dim(), t)]


class JobSource:
    """A leased step of a job, read region by region from the nodes holding it (the byte-source
    interface of :mod:`.sources`: ``full``, ``box``, ``stream``, ``close``)."""

    remote = True  # slices are read region by region: Snapshot.get asks for boxes, not whole tensors

    def __init__(self, reader: JobReader, step: int, merged: dict[str, MergedTensor], sources: dict[str, Any],
                 leases: dict[str, tuple[Connection, int]]):
        self.reader, self.step, self.merged, self.sources, self.leases = reader, step, merged, sources, leases
        self.meta = {fqn: m.layout() for fqn, m in merged.items()}
        self.regions = _WholeRegions(self)

    reads_into = True  # full(fqn, out=...): parts land in the caller's tensor, no temporary

    def full(self, fqn: str, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.merged[fqn]
        return self._read(m, Box((0,) * len(m.shape), m.shape), out)

    def box(self, fqn: str, offsets=None, sizes=None) -> torch.Tensor:
        m = self.merged[fqn]
        offsets, sizes = check_box(fqn, m.shape, offsets, sizes)
        return self._read(m, Box(offsets, sizes))

    def stream(self, fqns: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((f, self.full(f)) for f in fqns)

    def _read(self, m: MergedTensor, want: Box, out: torch.Tensor | None = None) -> torch.Tensor:
        whole = m.nearest_whole
        holder = whole or next((r.holders[0][0] for r in m.regions if r.box.contains(want)), None)
        if holder is not None:  # one node holds all of it: a view of its segment, or its frames
            part = self._part(holder, m.fqn, want)
            return part if out is None else out.copy_(part)
        if out is None:
            out = torch.empty(want.shape, dtype=m.layout().torch_dtype)
        remote: dict[str, list] = {}  # node -> [(destination, dtype, read boxes)]
        for r in m.regions:
            part = intersect(r.box, want)
            if part is None or not part.numel:
                continue
            node = r.holders[0][0]
            dst = narrow_box(out, tuple(p - w for p, w in zip(part.offset, want.offset)), part.shape)
            src = self.sources[node]
            if not src.remote:
                dst.copy_(src.part(m.fqn, part))
            else:
                dtype, _, boxes = src.read_requests(m.fqn, part.offset, part.shape)
                remote.setdefault(node, []).append((dst, dtype, boxes))
        if remote:
            self._fetch(m.fqn, remote)
        return out

    def _part(self, node: str, fqn: str, want: Box) -> torch.Tensor:
        src = self.sources[node]
        if not src.remote:
            return src.part(fqn, want)
        try:
            return src.box(fqn, want.offset, want.shape)
        except StagerError as exc:
            raise self._down(node, exc, fqn) from None

    def _down(self, node: str, exc: StagerError, fqn: str) -> StagerError:
        if exc.code not in DOWN:
            return exc
        return self.reader._down(node, exc, f"reading {fqn} of step {self.step}")

    def _fetch(self, fqn: str, remote: dict[str, list]) -> None:
        """Read every node's parts, up to WINDOW requests in flight per node, all nodes at once."""
        queues = {node: [(rows, dtype, (offsets, sizes)) for dst, dtype, boxes in parts
                         for offsets, sizes, rows in _rows(dst, boxes)] for node, parts in remote.items()}
        inflight: dict[str, list] = {node: [] for node in queues}
        node = next(iter(queues))
        try:
            while any(queues.values()) or any(inflight.values()):
                for node, queue in queues.items():
                    while queue and len(inflight[node]) < WINDOW:
                        rows, dtype, box = queue.pop(0)
                        inflight[node].append((self.sources[node].send_read(fqn, box), rows, dtype, box[1]))
                for node, pending in inflight.items():
                    if pending:
                        rid, rows, dtype, sizes = pending.pop(0)
                        rows.copy_(self.sources[node].recv_read(rid, dtype, sizes))
        except StagerError as exc:
            raise self._down(node, exc, fqn) from None

    def close(self) -> None:
        for src in self.sources.values():
            src.close()
        _release(self.leases)


def _rows(dst: torch.Tensor, boxes: list[tuple]) -> Iterator[tuple]:
    """Each read box with the rows of ``dst`` it fills: ``(offsets, sizes, destination rows)``
    (read_requests splits a part along dimension 0 only)."""
    row = 0
    for offsets, sizes in boxes:
        n = sizes[0] if sizes else 1
        yield offsets, sizes, (dst[row:row + n] if sizes else dst)
        row += n
