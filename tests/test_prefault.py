"""Pages of /dev/shm are allocated by the writers that fault them in, in bulk, before their copy:
a full /dev/shm is a typed error before any byte is copied, never a SIGBUS."""

import mmap
import os

import pytest
import torch

from conftest import error_code, wire_plan
from stager.client import StagingClient
from stager.client.hook import writer as writer_mod
from stager.daemon import segments, steps
from stager.protocol import Begin, Commit, ErrorCode, Put, Sealed, StagerError
from stager.protocol.layout import plan_digest
from stager.protocol.shm import PAGE, SHM_DIR, populate_supported, prefault, view_bounds

needs_populate = pytest.mark.skipif(not populate_supported(), reason="kernel without MADV_POPULATE_WRITE (< 5.14)")
W4 = wire_plan(["w", "f32", [4], [0], [4]])
W4_DIGEST = plan_digest(W4)
FULL = StagerError(ErrorCode.MEMORY_LIMIT, "/dev/shm has no room for 1.0 MiB of a snapshot segment; enlarge /dev/shm")


@pytest.fixture
def shm_file():
    path = os.path.join(SHM_DIR, f"stager-test-prefault-{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    yield fd
    os.close(fd)
    os.unlink(path)


@needs_populate
def test_a_page_the_file_cannot_hold_is_an_error_not_a_sigbus(shm_file):
    os.ftruncate(shm_file, 2 * PAGE)
    view = torch.frombuffer(mmap.mmap(shm_file, 2 * PAGE), dtype=torch.uint8)
    os.ftruncate(shm_file, PAGE)  # one page of file under a two-page mapping: the second would SIGBUS
    assert prefault(view, 0, PAGE) is True
    with pytest.raises(StagerError) as err:
        prefault(view, 0, 2 * PAGE)
    assert err.value.code == ErrorCode.MEMORY_LIMIT and "enlarge /dev/shm" in err.value.message


@needs_populate
def test_prefault_allocates_exactly_the_pages_asked_for(shm_file):
    os.ftruncate(shm_file, 64 * PAGE)
    view = torch.frombuffer(mmap.mmap(shm_file, 64 * PAGE), dtype=torch.uint8)
    assert os.fstat(shm_file).st_blocks == 0  # created empty
    assert prefault(view, 8 * PAGE + 100, 12 * PAGE)  # an unaligned start still covers its page
    assert os.fstat(shm_file).st_blocks * 512 == 4 * PAGE
    assert prefault(view, 5, 5) is True  # nothing to do


@pytest.mark.parametrize(
    "shape,index,bounds",
    [
        ((4, 8), (slice(None), slice(None)), (0, 128)),  # the whole block
        ((4, 8), (slice(1, 3), slice(None)), (32, 96)),  # rows 1-2
        ((4, 8), (slice(1, 3), slice(2, 4)), (40, 80)),  # a box: first to last byte
        ((4, 8), (slice(2, 2), slice(None)), (0, 0)),  # empty: no address
    ],
)
def test_view_bounds(shape, index, bounds):
    seg = torch.zeros(256, dtype=torch.uint8)
    view = seg[:128].view(torch.float32).view(shape)[index]
    assert view_bounds(seg, view) == bounds


@needs_populate
def test_segments_are_created_empty_unless_the_kernel_cannot_prefault(monkeypatch):
    seg = segments.Segment(f"stager-{os.getuid()}-{os.getpid()}-t0", 1 << 20)
    try:
        assert os.stat(os.path.join(SHM_DIR, seg.name)).st_blocks == 0
    finally:
        seg.unlink()
    monkeypatch.setattr(segments, "populate_supported", lambda: False)
    seg = segments.Segment(f"stager-{os.getuid()}-{os.getpid()}-t1", 1 << 20)
    try:
        assert os.stat(os.path.join(SHM_DIR, seg.name)).st_blocks * 512 >= 1 << 20  # reserved up front
    finally:
        seg.unlink()


def test_a_put_that_does_not_fit_fails_the_step_and_the_daemon_goes_on(make_daemon, raw_peer, monkeypatch):
    d = make_daemon()
    p = raw_peer(d.endpoint)
    p.hello()

    def full(*args):
        raise FULL

    monkeypatch.setattr(steps, "prefault", full)
    assert p.request(Begin(step=1, digest=W4_DIGEST, plan=W4, shm=False)).TYPE == "begin_reply"
    reply = p.request(Put(step=1, regions=[0], frames=[bytes(16)]))
    assert error_code(reply) == ErrorCode.STEP_FAILED.value and "do not fit" in reply.message
    assert "enlarge /dev/shm" in reply.message
    monkeypatch.undo()
    assert p.request(Begin(step=2, digest=W4_DIGEST, plan=None, shm=False)).TYPE == "begin_reply"
    assert p.request(Put(step=2, regions=[0], frames=[bytes(range(16))])).TYPE == "ok"
    assert isinstance(p.request(Commit(step=2)), Sealed)
    assert {v["step"]: v["state"] for v in d.status()["versions"]} == {1: "failed", 2: "sealed"}


def test_a_rank_whose_pages_do_not_fit_fails_its_step_with_the_reason(make_daemon, monkeypatch):
    d = make_daemon()

    def full(*args):
        raise FULL

    monkeypatch.setattr(writer_mod, "prefault", full)
    with StagingClient(d.endpoint, rank=0, local_world_size=1, world_size=1) as c:
        with pytest.raises(StagerError) as err:
            c.stage({"w": torch.ones(1024)}, step=1).wait(30)
        assert err.value.code == ErrorCode.MEMORY_LIMIT and "enlarge /dev/shm" in err.value.message
        monkeypatch.undo()
        assert c.stage({"w": torch.ones(1024)}, step=2).wait(30)["step"] == 2
