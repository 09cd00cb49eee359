#!/usr/bin/env python
"""Protocol fuzz campaign: random and mutated messages from several peers while a real job stages.

    python stress/fuzz.py [--messages 100000] [--peers 4] [--seed 0] [--quick]

What runs:

- a ``stager serve`` subprocess on a private ipc endpoint (its log is kept and scanned);
- a real job: a process with a ``StagingClient`` (local rank 0 of 1) staging versions whose every
  tensor is a pure function of the step (``_stresslib.pattern``), one after the other;
- a reader process with a ``Subscriber``: every version the job sealed is leased by step and
  compared byte for byte with what that step must hold (and the newest version now and then);
- ``--peers`` fuzzing threads, each its own ZeroMQ DEALER, up to a few requests in flight each.
  Peers have personalities: some say hello as a reader first, some never say hello, some say hello
  as a trainer (refused with ``rank_conflict`` while the job holds local rank 0). Messages: valid
  encodings of every message type (from ``tests/wire_examples.py``), then mutated: fields of the
  wrong type, unhashable values where a str is expected, deep nesting, huge ints, NaN, missing and
  extra fields, lists for the type header, bad versions and ids, random bytes, truncated or
  bit-flipped msgpack, extra frames. A few times per run the job steps aside (closes its client:
  bye) for a *trainer window*: the trainer peers register as local rank(s) of a 1- or 2-rank "job"
  and drive begin/put/commit/abort with mostly well-formed plans (so the staging state machine,
  not only the decoder, gets fuzzed), then say bye; the real job reconnects (a new epoch) and
  carries on. Versions sealed by fuzzers carry no token and are counted as foreign.

Failures (exit 1; the first few printed above the summary line):

- any reply with code ``internal``; any request without a reply within ``--reply-timeout``, plus
  the daemon's step timeout for a request it may defer (begin, commit: held back until the step's
  partners, memory or segment allow, and answered at the latest at the step timeout after the
  daemon read it); a reply that does not decode, or answers nothing this peer asked (duplicate).
  A reply that comes after its request was counted unanswered is named with it, and how late it
  came (a daemon starved of CPU answers late, one that lost the request never does).
- a stage of the real job that fails (the fuzzers cannot hold its rank: any failure is a bug);
- a reader mismatch, or a version the job sealed that the reader cannot lease while it is the newest;
- the daemon crashing, exiting non-zero on SIGTERM, a traceback in its log, or segments left in
  /dev/shm after it stopped.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _stresslib as lib  # noqa: E402

JOB_STEP0 = 1_000_000  # the real job's steps; fuzz-trainer steps live far above (1 << 40) or are junk
FUZZ_STEP0 = 1 << 40
IN_FLIGHT = 4  # requests in flight per peer
STEP_TIMEOUT = 5.0  # the daemon's --step-timeout
# requests the daemon may hold back (Steps.on_begin, Steps.on_commit) until, at the latest, the step
# timeout after it read them, checked once per housekeeping tick: their replies may take that much
# longer than the others'. Without it, a deferred request was the first to run past --reply-timeout
# when the daemon was starved of CPU (RELIABILITY.md, known issues: the fuzz run at cf5dd60).
DEFERRED = ("begin", "commit")
TOKEN_KEY = "meta.token"


# ---------------------------------------------------------------------------------------------- the real job


def job_main(endpoint: str, token: str, conn) -> None:
    """The real job: stages what the controller asks, one version at a time, and says how it went."""
    import torch

    torch.set_num_threads(1)
    from stager.client import StagingClient

    client = None
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stage":
                step = cmd[1]
                if client is None:
                    # the fuzzers keep the daemon busy on purpose (and CI starves it of CPU): an answer
                    # later than the default 1 s ack_timeout is no hung daemon here, and every stage must seal
                    client = StagingClient(
                        endpoint,
                        rank=0,
                        local_world_size=1,
                        world_size=1,
                        strict=True,
                        timeout=30.0,
                        seal_timeout=60.0,
                        ack_timeout=30.0,
                    )
                sd = lib.expected_state(step)
                sd["meta"] = {"token": token, "step": step}
                t0 = time.monotonic()
                try:
                    client.stage(sd, step=step).wait(90)
                    conn.send(("sealed", step, time.monotonic() - t0, None))
                except Exception as exc:
                    conn.send(("failed", step, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"))
            elif cmd[0] == "pause":
                if client is not None:
                    client.close()
                    client = None
                conn.send(("paused",))
            else:
                break
    finally:
        if client is not None:
            client.close()


def reader_main(endpoint: str, token: str, conn) -> None:
    """The reader: leases the version it is told (or the newest) and checks it byte for byte."""
    import torch

    torch.set_num_threads(1)
    from stager.client import Subscriber

    with Subscriber(endpoint, timeout=30.0) as sub:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            try:
                with sub.at(cmd[1]) if cmd[0] == "check" else sub.latest() as snap:
                    if snap.objects.get(TOKEN_KEY) != token:
                        conn.send(("foreign", snap.step, []))
                        continue
                    problems = lib.check_tensors(snap.items(), snap.step)
                    if snap.objects.get("meta.step") != snap.step:
                        problems.append(f"step {snap.step}: train state says step {snap.objects.get('meta.step')}")
                    conn.send(("checked", snap.step, problems))
            except Exception as exc:
                conn.send(("error", cmd[1] if len(cmd) > 1 else None, [f"{type(exc).__name__}: {exc}"]))


# ---------------------------------------------------------------------------------------------- message making

HUGE = [2**63 - 1, -(2**63), 2**64 - 1, 2**62 + 1, -(2**40), 2**53 + 1]
STRS = [
    "",
    "x",
    "stager-0-1-1",
    "../../etc/passwd",
    "w" * 300,
    "f32",
    "bf16",
    "zz",
    "reader",
    "admin",
    "layers.0.w",
    "\u00e9\u4e2d\U0001f600",
    "a\x00b",
    "w" * 20000,
]


def nested(rng: random.Random, depth: int):
    value = rng.choice([None, 1, "x", b""])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(15 if depth < 2 else 10)
    if kind == 0:
        return rng.randint(0, 10)
    if kind == 1:
        return rng.choice(HUGE)
    if kind == 2:
        return rng.choice(STRS)
    if kind == 3:
        return None
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return rng.randbytes(rng.choice([0, 1, 16, 300]))
    if kind == 6:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), -float("inf"), 1e300, 5e-324])
    if kind == 7:
        return -rng.randint(1, 1000)
    if kind == 8:
        return [] if rng.random() < 0.5 else {}
    if kind == 9:
        return rng.randint(11, 1 << 31)
    if kind == 10:
        return [junk(rng, depth + 1) for _ in range(rng.randint(1, 5))]
    if kind == 11:
        return {rng.choice(STRS[:6]): junk(rng, depth + 1) for _ in range(rng.randint(1, 4))}
    if kind == 12:  # a map with keys that are not strings
        return {rng.choice([0, -1, 2**63 - 1, b"k", None, 1.5, True]): junk(rng, depth + 1)}
    if kind == 13:
        return nested(rng, rng.choice([3, 15, 16, 17, 40, 200]))
    return [
        rng.choice(STRS[:8]),
        rng.choice(["f32", "bf16", "zz", "f8e4m3", [], {}]),
        [rng.choice([-1, 0, 3, 2**62])],
        [rng.choice([-1, 0, 1])],
        [rng.choice([-1, 0, 2, 2**40])],
    ]


def mutate(rng: random.Random, value, depth: int = 0):
    """A structurally close but altered copy of a wire value."""
    r = rng.random()
    if isinstance(value, list) and value and r < 0.7 and depth < 6:
        out = list(value)
        op = rng.randrange(5)
        i = rng.randrange(len(out))
        if op == 0:
            out[i] = mutate(rng, out[i], depth + 1)
        elif op == 1:
            del out[i]
        elif op == 2:
            out.insert(i, junk(rng))
        elif op == 3:
            out = out * rng.choice([2, 50])
        else:
            out[i] = [out[i]]
        return out
    if isinstance(value, dict) and value and r < 0.7 and depth < 6:
        out = dict(value)
        key = rng.choice(list(out))
        op = rng.randrange(4)
        if op == 0:
            out[key] = mutate(rng, out[key], depth + 1)
        elif op == 1:
            del out[key]
        elif op == 2:
            out[rng.choice(["extra", "", 7, b"k"])] = junk(rng)
        else:
            out[key] = junk(rng)
        return out
    if isinstance(value, str) and r < 0.5:
        return rng.choice([[value], {value: value}, value.encode(), value * 1000, value + "\u0000", 0, None])
    if isinstance(value, bool) and r < 0.5:
        return rng.choice([int(value), "true", None, [value]])
    if isinstance(value, int) and r < 0.6:
        out = rng.choice([value + 1, -value - 1, float(value), str(value), [value], True, *HUGE])
        return out if not isinstance(out, int) or -(2**63) <= out < 2**64 else HUGE[0]
    return junk(rng)


class Messages:
    """Builds the frames of one fuzz message and the reply id the daemon must answer with."""

    def __init__(self):
        import msgpack

        from stager.protocol import PROTOCOL_VERSION
        from stager.protocol.frames import message_types

        self.msgpack, self.version = msgpack, PROTOCOL_VERSION
        self.types = message_types()
        self.requests = sorted(
            t
            for t, c in self.types.items()
            if not t.endswith("reply") and t not in ("sealed", "ok", "pong", "error", "announce")
        )
        self.replies = sorted(set(self.types) - set(self.requests))
        sys.path.insert(0, os.path.join(lib.REPO, "tests"))
        examples: dict[str, list[dict]] = collections.defaultdict(list)
        try:
            from wire_examples import EXAMPLES  # the golden-bytes examples: one valid message of every type

            for msg in EXAMPLES:
                examples[msg.TYPE].append(msg.body())
        except Exception as exc:  # the examples file moved: defaults still give valid bodies
            print(f"fuzz: tests/wire_examples.py not usable ({exc}); using default bodies", file=sys.stderr)
        for kind, cls in self.types.items():
            examples[kind].append(cls().body())
        self.examples = examples

    def pack(self, obj) -> bytes:
        return self.msgpack.packb(obj, use_bin_type=True)

    def generic(self, rng: random.Random, rid: int, *, trainer_hello_ok: bool) -> tuple[list[bytes], str]:
        """A random, usually malformed, message of any type."""
        for _ in range(20):
            try:
                return self._generic(rng, rid, trainer_hello_ok=trainer_hello_ok)
            except (OverflowError, TypeError, ValueError):  # msgpack cannot encode that mutation: draw again
                continue
        return [self.valid(rng, "ping", rid)], "ping/valid"

    def expected_id(self, frame0: bytes, n_frames: int) -> int:
        """The id the daemon puts on its reply: the header's int id when it can read one, else 0."""
        from stager.daemon import server

        if n_frames > server._MAX_FRAMES:
            return 0
        try:
            header = self.msgpack.unpackb(frame0, raw=False, strict_map_key=False)
        except Exception:
            return 0
        rid = header.get("id") if isinstance(header, dict) else None
        return rid if type(rid) is int else 0

    def header(self, kind, rid, body) -> dict:
        return {"v": self.version, "t": kind, "id": rid, "b": body}

    def valid(self, rng: random.Random, kind: str, rid: int) -> bytes:
        return self.pack(self.header(kind, rid, dict(rng.choice(self.examples[kind]))))

    def _generic(self, rng: random.Random, rid: int, *, trainer_hello_ok: bool) -> tuple[list[bytes], str]:
        kind = rng.choice(self.requests) if rng.random() < 0.92 else rng.choice(self.replies)
        body = dict(rng.choice(self.examples[kind]))
        r = rng.random()
        extra: list[bytes] = []
        if r < 0.12:
            what = "valid"
        elif r < 0.50:  # field mutations: past the decoder into the codecs and handlers
            what = "field"
            for _ in range(rng.choice([1, 1, 2, 3])):
                if body and rng.random() < 0.85:
                    name = rng.choice(list(body))
                    body[name] = mutate(rng, body[name]) if rng.random() < 0.6 else junk(rng)
                else:
                    body[rng.choice(["zz", "id", "", "v"])] = junk(rng)
        elif r < 0.57:  # the whole body replaced: fields of the right names, any values
            what = "junk-body"
            body = {name: junk(rng) for name in body if rng.random() < 0.9}
        else:
            what = "header"
        if kind == "hello" and not trainer_hello_ok and body.get("role") == "trainer":
            body["role"] = "reader"  # only trainer peers may ever register as a rank (see the docstring)
        header = self.header(kind, rid, body)
        if what == "header":
            key = rng.choice(["v", "t", "t", "id", "b", "extra", "drop", "shape"])
            if key == "v":
                header["v"] = rng.choice([0, 2, "1", None, 1.0, True, 2**63 - 1, -1, [1], {"v": 1}])
            elif key == "t":
                header["t"] = rng.choice(
                    [
                        [kind],
                        None,
                        7,
                        "",
                        "nope",
                        "x" * 1000,
                        {"t": kind},
                        kind.encode(),
                        kind.upper(),
                        kind + " ",
                        [kind, kind],
                        rng.choice(self.replies),
                    ]
                )
            elif key == "id":
                header["id"] = rng.choice(["1", None, 1.5, True, [1], -5, 2**63 - 1, 2**64 - 1, -(2**63), {}])
            elif key == "b":
                header["b"] = rng.choice([None, [], "x", 5, b"\x00", [body], nested(rng, 20)])
            elif key == "extra":
                header[rng.choice(["x", "", 0, b"b"])] = junk(rng)
            elif key == "drop":
                del header[rng.choice(["v", "t", "id", "b"])]
            else:
                header = rng.choice([[self.version, kind, rid, body], kind, rid, None, [header]])
        frame0 = self.pack(header)
        r = rng.random()
        if r < 0.06:
            what += "+truncated"
            frame0 = frame0[: rng.randrange(len(frame0))]
        elif r < 0.11:
            what += "+bitflip"
            b = bytearray(frame0)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            frame0 = bytes(b)
        elif r < 0.14:
            what += "+random"
            frame0 = rng.randbytes(rng.choice([0, 1, 5, 64, 4096]))
        elif r < 0.16:
            what += "+deep"
            depth = rng.choice([17, 100, 1000, 5000, 200_000])
            tail = b"\x91" * depth + b"\xc0"  # fixarray(1) ... nil: nested far past the daemon's limit
            head = self.pack({"v": self.version, "t": kind, "id": rid})  # fixmap(3): make it fixmap(4) ...
            frame0 = bytes([head[0] + 1]) + head[1:] + self.pack("b") + b"\x81" + self.pack("x") + tail
        if rng.random() < 0.15:
            what += "+frames"
            extra = [rng.randbytes(rng.choice([0, 1, 8, 64, 4096, 1 << 20])) for _ in range(rng.randint(1, 4))]
        elif rng.random() < 0.0015:
            what += "+too-many-frames"
            extra = [b""] * 70_000
        return [frame0, *extra], f"{kind}/{what}"


class TrainerMoves:
    """Mostly well-formed trainer traffic for a trainer window: hello as local rank ``rank`` of
    ``lws``, begins with valid plans (shared layouts across the window's ranks, so steps seal),
    puts of the assigned regions, commits with objects and quantization metadata, aborts."""

    DTYPES = ["f32", "bf16", "f16", "i64", "u8", "f8e4m3", "bool", "f64"]

    def __init__(self, msgs: Messages, rng: random.Random, window: int, rank: int, lws: int, host: str):
        from stager.protocol.layout import plan_digest, plan_from_wire

        self.msgs, self.rng, self.rank, self.lws = msgs, rng, rank, lws
        self.local = rng.random() < 0.7
        self.host = host if self.local else f"fuzzhost-{window}"
        self.step0 = FUZZ_STEP0 + window * 1000
        self.plans = []
        for layout in range(3):  # the same three layouts on every rank of the window
            lrng = random.Random(window * 100 + layout)
            wire = []
            for t in range(lrng.randint(1, 3)):
                rows, cols = lrng.randint(lws, 6), lrng.randint(1, 5)
                lo, hi = rows * rank // lws, rows * (rank + 1) // lws
                wire.append([f"fz{t}.w", lrng.choice(self.DTYPES), [rows, cols], [lo, 0], [hi - lo, cols]])
            plan = plan_from_wire(wire)
            self.plans.append((wire, plan_digest(plan)))
        self.began: dict[int, tuple[list, object]] = {}  # step -> (wire plan, assignment or None)
        self.assignments: dict[str, object] = {}  # layout id -> assignment (sent once per layout)
        self.open: list[int] = []  # steps whose begin was answered: put and commit them

    def hello(self, rid: int) -> list[bytes]:
        import psutil

        me = psutil.Process()
        body = {
            "role": "trainer",
            "rank": self.rank,
            "local_world_size": self.lws,
            "world_size": self.lws,
            "pid": me.pid if self.local else self.rng.randint(1, 1 << 30),
            "start_time": _create_time(),
            "host_id": self.host,
        }
        return [self.msgs.pack(self.msgs.header("hello", rid, body))]

    def bye(self, rid: int) -> list[bytes]:
        return [self.msgs.pack(self.msgs.header("bye", rid, {}))]

    def on_begin_reply(self, step: int, reply) -> None:
        self.open = [*self.open[-7:], step]
        if reply.assignment is not None:
            self.assignments[reply.layout] = reply.assignment
        if step in self.began:
            wire, _ = self.began[step]
            self.began[step] = (wire, self.assignments.get(reply.layout))

    def move(self, rid: int) -> tuple[list[bytes], str, dict]:
        from stager.protocol.dtypes import dtype_from_name

        rng, msgs = self.rng, self.msgs
        r = rng.random()
        ctx: dict = {}
        if r < 0.05:
            return self.hello(rid), "hello/trainer", ctx
        recent = self.open if self.open and rng.random() < 0.8 else list(self.began)[-6:]
        step = rng.choice(recent) if recent and rng.random() < 0.9 else self.step0 + rng.randint(0, 40)
        if r < 0.45:
            wire, digest = rng.choice(self.plans)
            body = {
                "step": self.step0 + rng.randint(0, 40) if rng.random() < 0.7 else rng.choice([step, 0, 5]),
                "digest": digest,
                "plan": wire,
                "full_world": rng.random() < 0.9,
                "shm": self.local if rng.random() < 0.9 else not self.local,
                "wait_ms": rng.choice([0, 0, 0, 50, 10**9]),
            }
            if rng.random() < 0.1:
                body["plan"] = None  # "you know this digest": plan_required the first time
            elif rng.random() < 0.05:
                body["digest"] = digest[::-1]
            self.began.setdefault(body["step"], (wire, None))
            ctx = {"begin": body["step"]}
            kind = "begin"
        elif r < 0.62:
            wire, assignment = self.began.get(step, (rng.choice(self.plans)[0], None))
            regions, frames = [], []
            for i, entry in enumerate(wire):
                if assignment is not None and i < len(assignment) and assignment[i] is None and rng.random() < 0.9:
                    continue
                n = 1
                for s in entry[4]:
                    n *= s
                size = n * dtype_from_name(entry[1]).itemsize
                if rng.random() < 0.1:
                    size = rng.choice([0, size + 1, max(0, size - 1), 1 << 16])
                regions.append(i if rng.random() < 0.95 else rng.choice([-1, 99, 2**63 - 1]))
                frames.append(rng.randbytes(size))
            body = {"step": step, "regions": regions}
            kind = "put"
            if rng.random() < 0.05:
                frames = frames[:-1] if frames else [b"x"]
            header = msgs.header(kind, rid, body)
            return [msgs.pack(header), *frames], "put/trainer", ctx
        elif r < 0.85:
            objects = {"train.step": step, "fz": rng.choice([[1.5, "x", None, b"raw"], {"a": {"b": [1]}}, junk(rng)])}
            model_info = rng.choice([None, {"adapter": "identity"}, {"adapter": junk(rng)}, {"hf_config": junk(rng)}])
            wire, _ = self.began.get(step, (self.plans[0][0], None))
            quant = {}
            if rng.random() < 0.25 and len(wire) > 1:
                quant = {
                    wire[0][0]: {
                        "scale": wire[1][0],
                        "mode": rng.choice(["mul", "div", "xor"]),
                        "dtype": rng.choice(["f32", "bf16", "f8e4m3", "zz"]),
                    }
                }
            body = {"step": step, "objects": objects, "model_info": model_info, "quant": quant}
            kind = "commit"
            if step in self.open and rng.random() < 0.9:
                self.open.remove(step)
        elif r < 0.9:
            body = {"step": step, "reason": rng.choice(["fuzz", "x" * 5000, ""])}
            kind = "abort"
        else:  # a mutated trainer message
            kind = rng.choice(["begin", "put", "commit", "abort"])
            wire, digest = rng.choice(self.plans)
            body = {
                "begin": {"step": step, "digest": digest, "plan": wire, "full_world": True, "shm": True, "wait_ms": 0},
                "put": {"step": step, "regions": [0]},
                "commit": {"step": step, "objects": {}, "model_info": None, "quant": {}},
                "abort": {"step": step, "reason": ""},
            }[kind]
            name = rng.choice(list(body))
            body[name] = mutate(rng, body[name])
        try:
            return [msgs.pack(msgs.header(kind, rid, body))], f"{kind}/trainer", ctx
        except (OverflowError, TypeError, ValueError):
            return [msgs.valid(rng, "ping", rid)], "ping/valid", {}


# ---------------------------------------------------------------------------------------------- the peers


class Control:
    """What the controller and the peers share: the message budget and the trainer window."""

    def __init__(self, total: int):
        self.total, self.sent = total, 0
        self.lock = threading.Lock()
        self.window = threading.Event()  # trainer window open: trainer peers register as ranks
        self.closing = threading.Event()  # trainer peers: drain, say bye, report closed
        self.window_no = 0
        self.window_lws = 1
        self.abort = threading.Event()

    def take(self) -> int | None:
        with self.lock:
            if self.sent >= self.total or self.abort.is_set():
                return None
            self.sent += 1
            return self.sent


class Peer(threading.Thread):
    def __init__(
        self,
        index: int,
        personality: str,
        endpoint: str,
        seed: int,
        ctrl: Control,
        msgs: Messages,
        reply_timeout: float,
        host: str,
        trainer_slot: int,
        deferral: float | None = None,
    ):
        """``deferral``: how much longer than ``reply_timeout`` a deferred request (:data:`DEFERRED`)
        may wait for its reply (default: the daemon's step timeout and a housekeeping tick)."""
        super().__init__(name=f"fuzz-peer-{index}", daemon=True)
        import zmq

        from stager.daemon.server import HOUSEKEEPING_S

        self.index, self.personality, self.ctrl, self.msgs = index, personality, ctrl, msgs
        self.rng = random.Random(seed * 7919 + index)
        self.reply_timeout, self.host, self.trainer_slot = reply_timeout, host, trainer_slot
        self.deferral = STEP_TIMEOUT + HOUSEKEEPING_S if deferral is None else deferral
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.zmq = zmq
        self.ids = iter(range(1, 1 << 62))
        # rid -> (sent at, deadline, desc, ctx) of each request in flight with that reply id, oldest first
        self.waiting: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.n_waiting = 0
        # rid -> (sent at, desc, index in failures) of requests counted unanswered: a late reply is named with them
        self.overdue: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.slowest: dict[str, tuple[float, str]] = {}  # "deferred" / "immediate" -> (seconds, desc) of answers
        self.codes: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.leases: list[int] = []
        self.sent = 0
        self.closed = threading.Event()
        self.trainer: TrainerMoves | None = None
        self.trainer_window = -1

    # -------------------------------------------------------------- plumbing

    def send(self, frames: list[bytes], desc: str, ctx: dict | None = None) -> None:
        rid = self.msgs.expected_id(frames[0], len(frames))
        self.sock.send_multipart(frames, copy=len(frames) > 1000 or sum(map(len, frames)) < 65536)
        self.sent += 1
        now = time.monotonic()
        self.waiting[rid].append((now, now + self.allowance(desc), desc, ctx or {}))
        self.n_waiting += 1

    def allowance(self, desc: str) -> float:
        """Seconds the request ``desc`` ("kind/how") may wait for its reply."""
        return self.reply_timeout + (self.deferral if desc.split("/", 1)[0] in DEFERRED else 0.0)

    def pump(self, timeout_ms: int) -> None:
        """Take the replies that arrived (waiting up to ``timeout_ms`` for the first); expire the overdue."""
        from stager.protocol import decode

        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            frames = self.sock.recv_multipart()
            try:
                reply = decode(frames)
            except Exception as exc:
                self.failures.append(f"peer {self.index}: undecodable reply ({exc}): {frames[0][:80]!r}")
                continue
            if reply.TYPE == "announce":
                self.codes["(announce)"] += 1
                continue
            queue = self.waiting.get(reply.id)
            if not queue and self.overdue.get(reply.id):
                self._late(reply)
                continue
            if not queue:
                self.failures.append(
                    f"peer {self.index}: a {reply.TYPE} reply with id {reply.id} that answers "
                    f"nothing in flight: {reply!r}"[:400]
                )
                continue
            sent_at, _, desc, ctx = queue.popleft()
            if not queue:
                del self.waiting[reply.id]
            self.n_waiting -= 1
            kind = "deferred" if desc.split("/", 1)[0] in DEFERRED else "immediate"
            took = time.monotonic() - sent_at
            if took > self.slowest.get(kind, (-1.0, ""))[0]:
                self.slowest[kind] = (took, desc)
            code = getattr(reply, "code", None) if reply.TYPE == "error" else reply.TYPE
            self.codes[code] += 1
            if code == "internal":
                self.failures.append(f"peer {self.index}: internal error for {desc}: {reply.message}"[:600])
            if reply.TYPE == "acquire_reply":
                self.leases.append(reply.lease)
            elif reply.TYPE == "begin_reply" and self.trainer is not None and "begin" in ctx:
                self.trainer.on_begin_reply(ctx["begin"], reply)
        now = time.monotonic()
        for rid in list(self.waiting):
            queue = self.waiting[rid]
            for entry in [e for e in queue if e[1] < now]:
                sent_at, _, desc, _ = entry
                queue.remove(entry)
                self.n_waiting -= 1
                self.codes["(unanswered)"] += 1
                self.overdue[rid].append((sent_at, desc, len(self.failures)))
                self.failures.append(f"peer {self.index}: no reply within {self.allowance(desc):.0f}s to {desc}")
            if not queue:
                del self.waiting[rid]

    def _late(self, reply) -> None:
        """``reply`` answers a request already counted unanswered: say how late it came, in that failure."""
        queue = self.overdue[reply.id]
        sent_at, desc, index = queue.popleft()
        if not queue:
            del self.overdue[reply.id]
        what = f"{reply.code}: {reply.message}" if reply.TYPE == "error" else reply.TYPE
        self.codes["(late)"] += 1
        self.failures[index] += f" (answered after {time.monotonic() - sent_at:.1f}s: {what})"[:400]

    def drain(self, deadline: float) -> None:
        while self.n_waiting and time.monotonic() < deadline:
            self.pump(50)
        self.pump(0)

    # -------------------------------------------------------------- one message

    def next_message(self, rid: int) -> tuple[list[bytes], str, dict]:
        rng, msgs = self.rng, self.msgs
        if self.trainer is not None:
            if rng.random() < 0.85:
                return self.trainer.move(rid)
            frames, desc = msgs.generic(rng, rid, trainer_hello_ok=True)
            return frames, desc, {}
        r = rng.random()
        if self.personality == "reader" and r < 0.04:
            body = {
                "role": "reader",
                "rank": 0,
                "local_world_size": 1,
                "world_size": 1,
                "pid": os.getpid(),
                "start_time": _create_time(),
                "host_id": self.host if rng.random() < 0.8 else "elsewhere",
            }
            return [msgs.pack(msgs.header("hello", rid, body))], "hello/reader", {}
        if self.personality == "trainer" and r < 0.04:  # refused: the job holds local rank 0
            body = {
                "role": "trainer",
                "rank": 0,
                "local_world_size": rng.choice([1, 2]),
                "world_size": 2,
                "pid": os.getpid(),
                "start_time": _create_time(),
                "host_id": self.host,
            }
            return [msgs.pack(msgs.header("hello", rid, body))], "hello/trainer-conflict", {}
        if self.leases and r < 0.12:
            lease = self.leases.pop(rng.randrange(len(self.leases)))
            if rng.random() < 0.5:
                return [msgs.pack(msgs.header("release", rid, {"lease": lease}))], "release/own", {}
            items = rng.choice(
                [
                    [["layers.0.w", None, None]],
                    [["layers.0.w", [1, 0], [2, 48]]],
                    [["layers.0.b", [999], [1]]],
                    [["nope", None, None]],
                    [["counts", [0], [38]]],
                ]
            )
            self.leases.append(lease)
            return [msgs.pack(msgs.header("read", rid, {"lease": lease, "items": items}))], "read/own-lease", {}
        if r < 0.2:
            kind = rng.choice(["status", "ping", "acquire", "subscribe", "acquire"])
            return [msgs.valid(rng, kind, rid)], f"{kind}/valid", {}
        frames, desc = msgs.generic(rng, rid, trainer_hello_ok=False)
        return frames, desc, {}

    # -------------------------------------------------------------- loop

    def window_duty(self) -> None:
        """Trainer peers: register as a rank while the window is open; drain and say bye when it closes."""
        ctrl = self.ctrl
        if ctrl.closing.is_set():
            if not self.closed.is_set():
                self.drain(time.monotonic() + self.reply_timeout + self.deferral)
                rid = next(self.ids)
                self.send(
                    self.trainer.bye(rid) if self.trainer else [self.msgs.pack(self.msgs.header("bye", rid, {}))],
                    "bye/window-end",
                )
                self.drain(time.monotonic() + self.reply_timeout + self.deferral)
                self.trainer = None
                self.closed.set()
            return
        if ctrl.window.is_set() and self.trainer is None and self.trainer_window != ctrl.window_no:
            lws = ctrl.window_lws
            rank = self.trainer_slot % lws
            self.trainer = TrainerMoves(self.msgs, self.rng, ctrl.window_no, rank, lws, self.host)
            self.trainer_window = ctrl.window_no
            self.send(self.trainer.hello(next(self.ids)), "hello/trainer-window")

    def run(self) -> None:
        try:
            if self.personality == "reader":
                body = {
                    "role": "reader",
                    "rank": 0,
                    "local_world_size": 1,
                    "world_size": 1,
                    "pid": os.getpid(),
                    "start_time": _create_time(),
                    "host_id": self.host,
                }
                self.send([self.msgs.pack(self.msgs.header("hello", next(self.ids), body))], "hello/reader")
            while True:
                if self.personality == "trainer":
                    self.window_duty()
                    if self.ctrl.closing.is_set():
                        time.sleep(0.01)  # the controller is switching back to the real job
                        continue
                if self.n_waiting >= IN_FLIGHT:
                    self.pump(20)
                    continue
                if self.ctrl.take() is None:
                    break
                rid = next(self.ids)
                frames, desc, ctx = self.next_message(rid)
                self.send(frames, desc, ctx)
                self.pump(0)
            self.drain(time.monotonic() + self.reply_timeout + self.deferral)
            rid = next(self.ids)  # leave: the daemon ends this peer's leases and registration
            self.send([self.msgs.pack(self.msgs.header("bye", rid, {}))], "bye/end")
            self.drain(time.monotonic() + self.reply_timeout + self.deferral)
        except Exception as exc:
            import traceback

            self.failures.append(f"peer {self.index}: harness error {exc!r}\n{traceback.format_exc()[-800:]}")
        finally:
            self.closed.set()
            self.sock.close(0)


def _create_time() -> float:
    from stager.protocol.endpoint import process_start_time

    return process_start_time(os.getpid())


# ---------------------------------------------------------------------------------------------- controller


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=4, help="trainer windows during the run")
    p.add_argument("--reply-timeout", type=float, default=30.0)
    p.add_argument("--time-limit", type=float, help="seconds for the whole campaign (default: by --messages)")
    p.add_argument("--quick", action="store_true", help="about 3000 messages, for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 3000)
        args.windows = min(args.windows, 2)
    limit = args.time_limit or 120 + args.messages / 100
    with lib.Campaign("fuzz") as camp:
        stats = run(camp, args, time.monotonic() + limit)
    codes = stats["codes"]
    print("  replies: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1])))
    slowest = stats["slowest"]  # how close the daemon came to the reply timeout (deferred: plus the step timeout)
    print("  slowest answers: " + ", ".join(f"{k} {s:.1f}s ({desc})" for k, (s, desc) in sorted(slowest.items())))
    return camp.finish(
        f"fuzz: {stats['sent']} messages from {args.peers} peers (seed {args.seed}, {stats['windows']} trainer "
        f"windows), {codes.get('internal', 0)} internal, {codes.get('(unanswered)', 0)} unanswered, "
        f"{stats['staged']} versions staged and {stats['verified']} verified, {codes.get('sealed', 0)} sealed by "
        f"fuzzers, daemon alive: {'yes' if stats['alive'] else 'NO'}"
    )


def run(camp: lib.Campaign, args, deadline: float) -> dict:
    from stager.client.admin import daemon_status
    from stager.protocol.endpoint import host_id

    stats = {
        "sent": 0,
        "codes": collections.Counter(),
        "staged": 0,
        "verified": 0,
        "foreign": 0,
        "alive": False,
        "windows": 0,
        "slowest": {},
    }
    endpoint = f"ipc://{camp.tmp}/d.sock"
    daemon = camp.daemon(
        endpoint,
        ("--memory-limit", "256MiB", "--keep", "4", "--step-timeout", f"{STEP_TIMEOUT:g}", "--peer-timeout", "5"),
    )
    token = f"stress-{random.Random(args.seed).getrandbits(64):016x}"
    ctx = mp.get_context("spawn")
    job_conn, job_end = ctx.Pipe()
    reader_conn, reader_end = ctx.Pipe()
    job = ctx.Process(target=job_main, args=(endpoint, token, job_end), daemon=True)
    reader = ctx.Process(target=reader_main, args=(endpoint, token, reader_end), daemon=True)
    job.start()
    reader.start()
    camp.on_exit(lambda: lib.kill_process(job))
    camp.on_exit(lambda: lib.kill_process(reader))

    def ask(conn, proc, cmd, timeout=120.0):
        conn.send(cmd)
        end = time.monotonic() + timeout
        while not conn.poll(0.5):
            if not proc.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"{proc.name} {'died' if not proc.is_alive() else 'did not answer'} ({cmd})")
        return conn.recv()

    step = JOB_STEP0

    def stage_and_check() -> None:
        nonlocal step
        step += 1
        state, s, seconds, error = ask(job_conn, job, ("stage", step))
        if state != "sealed":
            camp.fail(f"the real job's stage of step {s} failed after {seconds:.2f}s: {error}")
            return
        stats["staged"] += 1
        kind, got, problems = ask(reader_conn, reader, ("check", step))
        if kind == "checked" and got == step and not problems:
            stats["verified"] += 1
        else:
            camp.fail(f"reader on step {step} (the newest sealed): {kind} {got} {problems[:3]}")

    def check_latest() -> None:
        kind, got, problems = ask(reader_conn, reader, ("latest",))
        if kind == "foreign":
            stats["foreign"] += 1
        elif kind == "checked" and not problems:
            pass
        elif kind == "error" and "no_version" in " ".join(problems):
            pass
        else:
            camp.fail(f"reader on the newest version: {kind} {got} {problems[:3]}")

    stage_and_check()  # the job holds local rank 0 before any fuzzer talks
    ctrl = Control(args.messages)
    msgs = Messages()
    personalities = ["reader", "none", "trainer"]
    peers = []
    trainer_slots = 0
    for i in range(args.peers):
        kind = personalities[i % 3] if args.peers > 2 else ["trainer", "reader"][i % 2]
        peers.append(Peer(i, kind, endpoint, args.seed, ctrl, msgs, args.reply_timeout, host_id(), trainer_slots))
        trainer_slots += kind == "trainer"
    trainers = [p for p in peers if p.personality == "trainer"]
    for peer in peers:
        peer.start()
    windows_at = [args.messages * (k + 1) // (args.windows + 1) for k in range(args.windows)] if trainers else []
    window_len = max(50, args.messages // (4 * max(1, args.windows)))
    try:
        while any(p.is_alive() for p in peers):
            if time.monotonic() > deadline:
                camp.fail("time limit reached: stopping the fuzzers")
                ctrl.abort.set()
                break
            if daemon.proc.poll() is not None:
                camp.fail(
                    f"the daemon exited with code {daemon.proc.returncode} mid-run; log: "
                    f"{lib.tail(os.path.join(camp.tmp, 'daemon.log'), 5)}"
                )
                ctrl.abort.set()
                break
            if windows_at and ctrl.sent >= windows_at[0]:
                windows_at.pop(0)
                trainer_window(
                    camp,
                    ctrl,
                    trainers,
                    window_len,
                    lambda: ask(job_conn, job, ("pause",)),
                    endpoint,
                    args.reply_timeout,
                    deadline,
                )
                stats["windows"] += 1
                check_latest()
                stage_and_check()  # the job takes local rank 0 again (a new epoch) ...
                ctrl.closing.clear()  # ... before the trainer peers may say hello again
                continue
            stage_and_check()
            if stats["staged"] % 10 == 0:
                check_latest()
        for peer in peers:
            peer.join(args.reply_timeout * 3)
        stage_and_check()  # after the storm: the job still stages, the reader still reads
        check_latest()
        stats["alive"] = daemon.proc.poll() is None
        status = daemon_status(endpoint, 10.0)
        stats["requests"] = status["counters"]["requests"]
    finally:
        ctrl.abort.set()
        for peer in peers:
            stats["sent"] += peer.sent
            stats["codes"].update(peer.codes)
            for kind, (took, desc) in peer.slowest.items():
                if took > stats["slowest"].get(kind, (-1.0, ""))[0]:
                    stats["slowest"][kind] = (took, desc)
            for f in peer.failures:
                camp.fail(f)
        for conn in (job_conn, reader_conn):
            try:
                conn.send(("stop",))
            except OSError:
                pass
        job.join(30)
        reader.join(30)
    if not stats["alive"]:
        camp.fail("the daemon is not alive at the end of the run")
    else:
        camp.stop_daemon_and_check(daemon)
        return stats
    for problem in camp.daemon_log_problems():
        camp.fail(problem)
    return stats


def trainer_window(
    camp,
    ctrl: Control,
    trainers: list[Peer],
    length: int,
    pause_job,
    endpoint: str,
    reply_timeout: float,
    deadline: float,
) -> None:
    """The job steps aside; trainer peers register as ranks and fuzz staging; they say bye. Returns
    with ``ctrl.closing`` still set: the caller clears it once the job holds its rank again."""
    from stager.client.admin import daemon_status

    reply = pause_job()
    if reply != ("paused",):
        camp.fail(f"the job did not pause: {reply}")
    ctrl.window_no += 1
    ctrl.window_lws = 1 + (ctrl.window_no % 2 == 0 and len(trainers) > 1)
    for t in trainers:
        if t.is_alive():  # a peer that already finished its share stays closed (its exit set it)
            t.closed.clear()
    start = ctrl.sent
    ctrl.window.set()
    while ctrl.sent < start + length and any(t.is_alive() for t in trainers) and time.monotonic() < deadline:
        time.sleep(0.01)
    ctrl.closing.set()
    for t in trainers:
        give_up = time.monotonic() + reply_timeout * 3
        while not t.closed.wait(0.2) and t.is_alive():  # a peer that exited is closed however it ended
            if time.monotonic() > give_up:
                camp.fail(f"trainer peer {t.index} did not close its window")
                break
    ctrl.window.clear()
    # every rank registration of the window must be gone before the job comes back
    end = time.monotonic() + 15
    while True:
        ranks = daemon_status(endpoint, 10.0)["ranks"]
        if not ranks:
            break
        if time.monotonic() > end:
            camp.fail(f"ranks still registered after the trainer window: {ranks}")
            break
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
