"""The job reader: the only thing that talks to daemons for reading.

A version is a set of regions held by N >= 1 nodes. A reader pointed at any daemon asks it for
the membership once per daemon session (``JobInfo``): a daemon in no multi-node job is a
one-member job. The job reader holds a connection to every member (the reader's own daemon's
included), takes and releases the leases of a version on each, and knows which steps exist where:

- one member: the step is leased there directly (its daemon says which one is newest);
- several: every node is asked which steps it holds (in parallel), the newest step that every
  answering node sealed and none failed is leased on every node holding part of it, the layouts
  merged (:func:`.planner.merge_layouts`, the reader's own node preferred, replicas read once). A
  node that dies or stops answering fails the read with :class:`~stager.protocol.NodeDown` naming
  it, within the reader's timeout; the next acquire falls back to the newest version the other
  nodes can still complete (replicated regions), or says which node it lacks.

Each node's bytes come through a byte source (:mod:`.sources`: shared memory on its host, frames
otherwise); the leases stay alive through the connections' heartbeats (:mod:`..heartbeat`).
Subscriptions and announcements from every member live here too: a reader is woken when each
member announced a step newer than the one it has.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from stager.protocol import Acquire, AcquireReply, ErrorCode, NodeDown, Release, StagerError, Subscribe, SubscribeReply
from stager.protocol.job import JobInfo, JobInfoReply
from stager.protocol.reads import Announce

from ..connection import Connection
from .planner import complete_steps, incomplete_reason, merge_layouts
from .sources import TRANSPORTS, SegmentMaps, open_source
from .version import LeasedVersion

log = logging.getLogger("stager.client")
DOWN = (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.NODE_DOWN)
ATTEMPTS = 3  # complete steps tried newest first when retention drops one between asking and leasing


class MembershipChanged(StagerError):
    """The membership the reader knew is out of date: ask for it again."""


class JobReader:
    """One reader's connections to every daemon of its job (its own daemon's, ``primary``, included).
    ``remote``: read over the sockets even on a daemon's host (None: only from other hosts).
    ``node``, ``auth_dir``: this reader's host id and CURVE keys (see :class:`Connection`).
    ``transport``: how bytes from another host (or ``remote``) come: ``"auto"`` NIXL where this
    reader has it and the node's daemon serves it, else frames; ``"nixl"`` NIXL or an error;
    ``"frames"`` always frames (:func:`.sources.open_source`). ``nixl_agent``: READ with that
    :class:`~.nixl_source.HeldAgent` (the daemon's, for its full assembler) instead of this process's own."""

    def __init__(
        self,
        endpoint: str | None,
        timeout: float,
        *,
        remote: bool | None = None,
        role: str = "reader",
        node: str | None = None,
        auth_dir: str | None = None,
        transport: str = "auto",
        nixl_agent=None,
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self._identity = {"node": node, "auth_dir": auth_dir}  # every connection's, the same
        self.primary = Connection(endpoint, role=role, **self._identity)
        self.timeout = timeout
        self.remote = remote
        self.role = role
        self.transport = transport
        self.nixl_agent = nixl_agent
        # the membership: unknown until the daemon is asked
        self.job = ""
        self.node = ""
        self.nodes = {}
        self.conns: dict[str, Connection] = {}
        self.newest: dict[str, tuple[int, int]] = {}  # node -> (seq, step) of its newest announcement
        self.last: dict[str, JobInfoReply] = {}  # node -> its last answer: a node that went silent counts with it
        self.up: set[str] = set()  # nodes subscribed to in their daemon's current session
        self._subscribed: dict[str, tuple | None] = {}  # node -> the connection's registration subscribed in
        self._asked: str | None = None  # the primary's session the membership was asked in
        self.maps = SegmentMaps()
        self.open: dict[int, LeasedVersion] = {}  # id -> the versions leased and not released
        # announcements may arrive while any request waits for its reply: every connection notes them
        self.primary.on_unsolicited = self._on_primary

    # ------------------------------------------------------------------ membership

    def members(self, force: bool = False) -> None:
        """Ask the reader's daemon for the job, once per daemon session (a restarted daemon may have
        forgotten the job, or joined another), or now when ``force``."""
        conn = self.primary
        if not force and conn.session is not None and self._asked == conn.session:
            return
        info = conn.request(JobInfo(), self.timeout, expect=JobInfoReply)
        self._asked = conn.session
        self._join(info)

    def refresh(self) -> None:
        """:meth:`members`, keeping the membership known before while the daemon does not answer."""
        try:
            self.members()
        except StagerError as exc:
            if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                raise

    def _join(self, info: JobInfoReply) -> None:
        nodes = dict(info.nodes)
        if (info.job, info.node, nodes) == (self.job, self.node, self.nodes):
            return
        old, self.conns = self.conns, {}
        for node, endpoint in nodes.items():
            if node == info.node:
                self.conns[node] = self.primary
            elif node in old and old[node] is not self.primary and self.nodes.get(node) == endpoint:
                self.conns[node] = old[node]
            else:
                self.conns[node] = Connection(endpoint, role=self.role, **self._identity)
                self.conns[node].on_unsolicited = functools.partial(self._note, node)
        for node, conn in old.items():
            if conn is not self.primary and self.conns.get(node) is not conn:
                conn.close()
        self.newest.clear()
        self.up.clear()
        self._subscribed.clear()
        self.last = {n: r for n, r in self.last.items() if n in nodes}
        self.job = info.job
        self.node = info.node
        self.nodes = nodes

    @property
    def multi(self) -> bool:
        return len(self.nodes) > 1

    def node_failed(self, node: str, exc: StagerError, doing: str) -> StagerError:
        """The error a reader sees: in a job of several nodes, a node that does not answer is named."""
        if isinstance(exc, NodeDown) or exc.code not in DOWN or not self.multi:
            return exc
        return NodeDown(
            node,
            f"node {node} ({self.nodes[node]}) of job {self.job} did not answer while {doing}: "
            f"{exc.message}. Its daemon died, hangs or is unreachable; a version it holds part "
            "of cannot be read until it is back (or from nodes holding replicas)",
        )

    def _ask_all(
        self, make: Callable[[str], Any], what: str, nodes: Iterable[str], expect=None
    ) -> tuple[dict[str, Any], dict[str, StagerError]]:
        """Send ``make(node)`` to every node in ``nodes`` first, then collect the replies:
        ``(replies, errors)`` by node."""
        sent = {}
        errors = {}
        replies = {}
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
                errors[node] = StagerError(
                    ErrorCode.UNAVAILABLE,
                    f"{self.nodes[node]} answered as node "
                    f"{reply.node!r}, not {node!r}: ipc endpoints are "
                    "per host; serve tcp and --advertise it",
                )
        moved = {n: r.job for n, r in replies.items() if r.job != self.job}
        if moved:
            raise MembershipChanged(
                ErrorCode.NO_VERSION,
                f"nodes {sorted(moved)} now belong to job "
                f"{next(iter(moved.values()))!r}, not {self.job!r}: "
                "the job changed; ask again",
            )
        down = {}
        for node, exc in errors.items():
            if exc.code not in DOWN and node == self.node:
                raise exc
            down[node] = exc.message  # another node that answers with an error is as good as down
        self.last.update(replies)
        return replies, down

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

    # ------------------------------------------------------------------ leases

    def acquire(self, step: int | None, allow_partial: bool = False) -> LeasedVersion:
        """Lease ``step`` (None: the newest complete one) on every node holding part of it."""
        for attempt in range(2):
            self.members(force=attempt > 0)
            try:
                return self._acquire(step, allow_partial, first=attempt == 0)
            except MembershipChanged:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _acquire(self, step: int | None, allow_partial: bool, first: bool) -> LeasedVersion:
        if not self.multi:  # one node: a partial version is its own (a reader that allows it reads its regions)
            version = self._lease(step, [self.node], {}, holes=True)
            if version.partial and (first or not allow_partial):
                version.close()
                if first:  # the daemon may have joined a job since it was asked: ask again
                    raise MembershipChanged(ErrorCode.PARTIAL, f"step {version.step} is partial")
                raise StagerError(
                    ErrorCode.PARTIAL,
                    f"step {version.step} holds only part of some tensors (the job "
                    "spans nodes); pass allow_partial=True and read them with "
                    "Snapshot.regions()",
                )
            return version
        states, down = self.states()
        if self.node in down:
            raise self.node_failed(
                self.node, StagerError(ErrorCode.UNAVAILABLE, down[self.node]), "asked for its steps"
            )
        complete, kinds = self.known_complete(states)
        if step is not None:
            if step not in complete:
                raise StagerError(
                    ErrorCode.NO_VERSION,
                    f"step {step} of job {self.job} is not complete: {incomplete_reason(step, kinds, down)}",
                )
            candidates = [step]
        else:
            candidates = complete[::-1][: ATTEMPTS + len(down) * ATTEMPTS]
            if not candidates:
                newest = max((s for r in states.values() for s in r.sealed), default=None)
                why = (
                    ""
                    if newest is None
                    else f" (newest step anywhere: {newest}: {incomplete_reason(newest, kinds, down)})"
                )
                raise StagerError(ErrorCode.NO_VERSION, f"no step of job {self.job} is sealed on every node yet{why}")
        first_error: StagerError | None = None
        for s in candidates:
            try:
                return self._lease(s, [n for n in states if n not in down], down, holes=allow_partial and not down)
            except StagerError as exc:
                # retention dropped it meanwhile, or it needs a node that is down: the next older
                # complete step (with replicas of the down node's regions elsewhere, one may be)
                if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN) or step is not None:
                    raise
                first_error = first_error or exc
        raise first_error  # type: ignore[misc]

    def readable(self, steps: Iterable[int], states: dict[str, JobInfoReply], down: dict[str, str]) -> list[int]:
        """Of ``steps``, those a reader can lease now: every region held by a node that answers (the
        lease :meth:`acquire` tries before it falls back to an older step; released at once)."""
        out = []
        for step in steps:
            try:
                version = self._lease(step, [n for n in states if n not in down], dict(down), holes=False, read=False)
            except StagerError as exc:
                if exc.code not in (ErrorCode.NO_VERSION, ErrorCode.NODE_DOWN, ErrorCode.PARTIAL):
                    raise
                continue  # gone meanwhile, or a region only a silent node holds
            version.close()
            out.append(step)
        return out

    def _order(self, nodes: list[str]) -> list[str]:
        """Nodes to read from, nearest first: on the reader's own host, then its daemon, then the rest."""
        return sorted(nodes, key=lambda n: (not self.conns[n].same_host, n != self.node, list(self.nodes).index(n)))

    def _lease(
        self, step: int | None, nodes: list[str], down: dict[str, str], *, holes: bool, read: bool = True
    ) -> LeasedVersion:
        """Lease ``step`` on ``nodes`` (``down``: those known not to answer, added to here) and merge
        their layouts (``holes``: a tensor they do not cover is incomplete, not an error)."""
        what = "acquire" if step is None else f"acquire of step {step}"
        replies, errors = self._ask_all(lambda n: Acquire(step=step), what, nodes, AcquireReply)
        leases = {n: (self.conns[n], r.lease) for n, r in replies.items()}
        try:
            for node, exc in errors.items():
                if exc.code not in DOWN or not self.multi:
                    raise exc
                down[node] = exc.message
            if self.node in down:
                raise self.node_failed(
                    self.node, StagerError(ErrorCode.UNAVAILABLE, down[self.node]), f"leasing {step}"
                )
            parts = {n: replies[n].tensors for n in replies}
            try:
                merged = merge_layouts(parts, self._order(list(replies)), replies[self.node].step, holes=holes)
            except StagerError as exc:
                if exc.code == ErrorCode.PARTIAL and down:
                    node = next(iter(down))
                    raise NodeDown(
                        node,
                        f"step {step} of job {self.job} needs a node that does not answer ("
                        f"{', '.join(f'node {n}: {why}' for n, why in down.items())}); "
                        f"{exc.message}",
                    ) from None
                raise
            sources = {}
            for n, r in replies.items() if read else ():
                try:
                    sources[n] = open_source(
                        self.conns[n],
                        r.lease,
                        r.segment,
                        r.size,
                        r.tensors,
                        remote=self.remote,
                        maps=self.maps,
                        timeout=self.timeout,
                        transport=self.transport,
                        nixl_agent=self.nixl_agent,
                    )
                except StagerError as exc:
                    raise self.node_failed(n, exc, f"opening step {r.step}") from None
        except BaseException:
            self._release(leases)
            raise
        objects, quant = {}, {}
        for node in self.nodes:  # the first node's (global rank 0's) train state wins, as on one node
            if node in replies:
                for k, v in replies[node].objects.items():
                    objects.setdefault(k, v)
                quant.update(replies[node].quant)
        primary = replies[self.node]
        version = LeasedVersion(
            self,
            primary.step,
            primary.seq,
            primary.lease,
            objects,
            primary.model_info,
            quant,
            merged,
            sources,
            leases,
            {n: r.seq for n, r in replies.items()},
            {n: r.tensors for n, r in replies.items()},
        )
        self.open[id(version)] = version
        return version

    def release(self, version: LeasedVersion) -> None:
        """End ``version``'s leases on every node (once)."""
        if self.open.pop(id(version), None) is not None:
            self._release(version.leases)

    def _release(self, leases: dict[str, tuple[Connection, int]]) -> None:
        """Every Release sent before any reply is waited for: one round trip for all nodes, as leasing (one per
        node in turn made a reader's release, and a dead node's timeout, add up with the node count)."""
        sent = []
        for conn, lease in leases.values():
            if conn.sock is None:
                continue  # closed (no longer a member): its daemon ended the lease on bye
            # the reader's own daemon gets the reader's patience; another node that died must not hold it up
            mine = conn is self.primary
            timeout = self.timeout if mine else min(self.timeout, 2.0)
            try:
                if conn.session is None:
                    conn.hello(timeout)
                sent.append((conn, lease, timeout, conn.send(Release(lease=lease))))
            except StagerError as exc:
                _release_failed(mine, lease, exc)
        for conn, lease, timeout, rid in sent:
            try:
                conn.wait_reply(rid, timeout, "release")
            except StagerError as exc:
                _release_failed(conn is self.primary, lease, exc)

    # ------------------------------------------------------------------ announcements

    def _note(self, node: str, msg: Any) -> None:
        if isinstance(msg, Announce):
            seen = self.newest.get(node)
            if seen is None or msg.seq > seen[0]:
                self.newest[node] = (msg.seq, msg.step)
        else:
            log.debug("stray reply from node %s: %r", node, msg)

    def _on_primary(self, msg: Any) -> None:
        self._note(self.node, msg)

    def subscribe(self) -> None:
        """Subscribe on every member not subscribed in its daemon's current session (a restarted
        daemon starts a new one: its announcements so far are forgotten); :attr:`up` says which
        members are subscribed now."""
        for conn in self.conns.values():
            conn.poll_monitor(0)  # a lost connection ends its session: subscribe again below
        todo = [n for n, c in self.conns.items() if c.session is None or self._subscribed.get(n) != c.registration]
        replies, errors = self._ask_all(lambda n: Subscribe(), "subscribe", todo, SubscribeReply)
        for node, reply in replies.items():
            self._subscribed[node] = self.conns[node].registration
            self.up.add(node)
            self.newest.pop(node, None)
            if reply.step is not None:
                self.newest[node] = (reply.seq, reply.step)
        for node, exc in errors.items():
            if exc.code not in DOWN:
                raise exc
            self.up.discard(node)
            log.debug("subscribe to node %s failed: %s", node, exc)

    def newest_complete_hint(self) -> int | None:
        """The newest step every subscribed member announced (None: one of them announced nothing
        yet, or none is subscribed): no newer version can be complete."""
        if not self.up or not self.up <= set(self.newest):
            return None
        return min(self.newest[n][1] for n in self.up)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for announcements from any member."""
        conns = [c for c in (self.conns.values() or [self.primary]) if c.sock is not None]
        for conn, msg in Connection.recv_any(conns, timeout):
            conn.on_unsolicited(msg)

    # ------------------------------------------------------------------ end

    def release_all(self) -> None:
        for version in list(self.open.values()):
            version.close()
        self.maps.clear()

    def close(self) -> None:
        """Disconnect from every member (each daemon ends this reader's leases on bye)."""
        for conn in self.conns.values():
            if conn is not self.primary:
                conn.close()
        self.conns = {}
        self.primary.close()


def _release_failed(mine: bool, lease: int, exc: StagerError) -> None:
    # a closed or dead connection: the daemon ends its leases itself
    log.log(logging.WARNING if mine else logging.DEBUG, "release of lease %d failed: %s", lease, exc)
