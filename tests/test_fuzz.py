"""Random, malformed requests of every type: each gets a reply, and the daemon keeps serving."""

import random

import msgpack
import torch

from stager.client import StagingClient, Subscriber
from stager.protocol import PROTOCOL_VERSION
from stager.protocol.frames import message_types

REQUESTS = [
    cls
    for cls in message_types().values()
    if not cls.TYPE.endswith("reply") and cls.TYPE not in ("sealed", "ok", "pong", "error")
]


def junk(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "huge", "str", "none", "bool", "bytes", "float", "list", "dict", "plan"]
    kind = rng.choice(kinds if depth < 2 else kinds[:8])
    if kind == "int":
        return rng.randint(0, 10)
    if kind == "neg":
        return -rng.randint(1, 1 << 40)
    if kind == "huge":
        return rng.randint(1 << 40, (1 << 63) - 1)
    if kind == "str":
        return rng.choice(["", "x", "stager-0-1-1", "../etc/passwd", "w" * 300, "f32", "trainer"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 16))
    if kind == "float":
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e300])
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        return {str(i): junk(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return [
        [
            junk(rng, 2),
            rng.choice(["f32", "bf16", "zz"]),
            [rng.randint(-1, 8)],
            [rng.randint(-1, 8)],
            [rng.randint(-1, 8)],
        ]
        for _ in range(rng.randint(0, 3))
    ]


def test_random_requests_never_take_the_daemon_down(make_daemon, raw_peer):
    d = make_daemon(step_timeout=2.0)
    rng = random.Random(1234)
    peers = [raw_peer(d.endpoint) for _ in range(3)]
    peers[1].hello(rank=0, local_world_size=1)
    peers[2].hello(role="reader")
    codes = {}
    for i in range(600):
        peer = rng.choice(peers)
        cls = rng.choice(REQUESTS)
        body = {name: junk(rng) for name in cls.SCHEMA if rng.random() < 0.95}
        if rng.random() < 0.5:  # mostly well-typed fields, to get past decoding into the handlers
            proto = cls()
            for name in cls.SCHEMA:
                if rng.random() < 0.6:
                    body[name] = getattr(proto, name) if rng.random() < 0.5 else body.get(name)
        header = {
            "v": PROTOCOL_VERSION if rng.random() < 0.95 else rng.randint(0, 3),
            "t": cls.TYPE,
            "id": i + 1,
            "b": body,
        }
        frames = [msgpack.packb(header, use_bin_type=True)]
        frames += [rng.randbytes(rng.choice([0, 3, 16, 64])) for _ in range(rng.choice([0, 0, 1, 2]))]
        peer.send_frames(frames)
        reply = peer.recv(timeout=10)  # every request is answered
        assert reply.id in (i + 1, 0), reply
        code = getattr(reply, "code", reply.TYPE)
        codes[code] = codes.get(code, 0) + 1
        assert code != "internal", f"request {i} ({cls.TYPE} {body!r}) hit a daemon bug: {reply.message}"
    assert d.thread.is_alive()
    assert d.status()["counters"]["requests"] > 100  # every one was received and counted
    # a real client still stages and reads back exactly what it sent
    sd = {"w": torch.randn(64, 3), "step": 1}
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as client:
        client.stage(sd, step=10**6).wait(20)
    with Subscriber(d.endpoint) as sub, sub.latest() as snap:
        assert snap.step == 10**6 and torch.equal(snap["w"], sd["w"])
