"""The daemon's status, composed in one place from each part's piece (pure: no daemon process).

A live daemon's status is checked against the schema by tests/test_status_view.py; these tables
check :func:`stager.daemon.status.compose` itself: where each piece lands, which keys are there
only when they apply, and that any combination of pieces gives what the documented schema says.
"""

import pytest

from stager.daemon.status import compose
from stager.status_view import schema_errors

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job

SCHEMA_ORDER = [
    "session",
    "pid",
    "epoch",
    "versions",
    "ranks",
    "local_world_size",
    "readers",
    "reads",
    "leases",
    "memory",
    "keep",
    "peer_timeout",
    "node",
    "job",
    "retention",
    "subscribers",
    "seq",
    "counters",
    "cpu_seconds",
    "state",
    "endpoint",
    "uptime_s",
    "subscriber_lag",
]

SEALED = {
    "step": 4,
    "state": "sealed",
    "phase": "sealed",
    "bytes": 16,
    "tensors": 1,
    "objects": 0,
    "partial": False,
    "leases": 1,
    "age_s": 0.25,
}
FAILED = {"step": 5, "state": "failed", "reason": "rank 1 aborted step 5: oom"}
JOB = {
    "job": "j1",
    "node": "a",
    "advertise": "tcp://a:7555",
    "nodes": {"a": "tcp://a:7555", "b": "tcp://b:7555"},
    "ranks": {"a": [0, 1], "b": [2, 3]},
    "world_size": 4,
}


def pieces(**over) -> dict:
    """A piece from every part, as a daemon with one rank, one reader and one sealed version reports them."""
    made = {
        "loop": {
            "pid": 4242,
            "cpu_seconds": 0.5,
            "state": "serving",
            "endpoint": "ipc:///tmp/s.sock",
            "uptime_s": 12.5,
            "subscriber_lag": [{"pid": 7, "rank": 0, "local": True, "seq": 1, "lag": 0}],
        },
        "shared": {
            "session": "ab12",
            "epoch": 1,
            "keep": 2,
            "peer_timeout": 30.0,
            "node": "a",
            "seq": 1,
            "counters": {"sealed": 1, "requests": 9},
        },
        "versions": [SEALED],
        "peers": {"ranks": {"0": {"pid": 99, "local": True}}, "local_world_size": 1, "readers": 1},
        "reading": {"reads": {"bytes_in_flight": 0, "deferred": 0, "cast_buffers": 0}, "leases": 1},
        "memory": {"used": 64, "limit": 1024, "pooled": 16, "draining": 0, "preallocated": 0},
        "retention": {"policy": "keep the newest", "leased_steps": [4], "waiting_for_memory": []},
        "subscribers": 1,
        "job": None,
        "assembly": None,
    }
    made.update(over)
    return made


def test_the_keys_come_in_the_schema_order_and_only_the_documented_ones():
    status = compose(**pieces())
    assert list(status) == SCHEMA_ORDER
    assert schema_errors(status) == []


@pytest.mark.parametrize(
    "key, piece, value",
    [
        ("session", "shared", "ab12"),
        ("pid", "loop", 4242),
        ("epoch", "shared", 1),
        ("versions", "versions", [SEALED]),
        ("ranks", "peers", {"0": {"pid": 99, "local": True}}),
        ("local_world_size", "peers", 1),
        ("readers", "peers", 1),
        ("reads", "reading", {"bytes_in_flight": 0, "deferred": 0, "cast_buffers": 0}),
        ("leases", "reading", 1),
        ("memory", "memory", {"used": 64, "limit": 1024, "pooled": 16, "draining": 0, "preallocated": 0}),
        ("keep", "shared", 2),
        ("peer_timeout", "shared", 30.0),
        ("node", "shared", "a"),
        ("retention", "retention", {"policy": "keep the newest", "leased_steps": [4], "waiting_for_memory": []}),
        ("subscribers", "subscribers", 1),
        ("seq", "shared", 1),
        ("counters", "shared", {"sealed": 1, "requests": 9}),
        ("state", "loop", "serving"),
        ("endpoint", "loop", "ipc:///tmp/s.sock"),
        ("uptime_s", "loop", 12.5),
    ],
)
def test_each_key_is_the_value_its_part_reported(key, piece, value):
    assert compose(**pieces())[key] == value, f"{key} comes from the {piece} piece"


@pytest.mark.parametrize(
    "over, present, absent",
    [
        ({}, {}, ("metrics", "insecure", "assembly")),
        (
            {"loop": {**pieces()["loop"], "metrics": "http://127.0.0.1:9108/metrics"}},
            {"metrics": "http://127.0.0.1:9108/metrics"},
            ("insecure", "assembly"),
        ),
        ({"loop": {**pieces()["loop"], "insecure": True}}, {"insecure": True}, ("metrics", "assembly")),
        (
            {"assembly": {"enabled": True, "assembled": [4]}},
            {"assembly": {"enabled": True, "assembled": [4]}},
            ("metrics", "insecure"),
        ),
        ({"job": JOB}, {"job": JOB}, ("metrics", "insecure", "assembly")),
    ],
)
def test_optional_keys_are_there_only_when_they_apply(over, present, absent):
    status = compose(**pieces(**over))
    assert {k: status[k] for k in present} == present
    assert not set(absent) & set(status)
    assert status["job"] == over.get("job")  # null until a trainer joined a multi-node job: always a key
    assert schema_errors(status) == []


@pytest.mark.parametrize(
    "versions",
    [
        [],
        [SEALED, {**SEALED, "step": 6, "state": "staging", "phase": "allocating", "leases": 0}],
        [{**SEALED, "partial": True, "held_regions": {"w": [[[0], [8]]]}, "assembled": True}, FAILED],
    ],
)
def test_any_mix_of_versions_fits_the_schema(versions):
    status = compose(**pieces(versions=versions))
    assert status["versions"] == versions and schema_errors(status) == []
