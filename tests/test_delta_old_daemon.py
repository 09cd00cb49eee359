"""A reader facing a daemon that predates ``Changes.sums`` (its decoder drops unknown body keys, its
handler never looks at them): simulated by clearing them before the current handler runs."""

import pytest
import torch

from helpers import wait_until
from stager.client import StagingClient, Subscriber
from stager.daemon import changes as daemon_changes
from test_delta_reads import SHAPES, changed, first, full, rl_step


@pytest.mark.parametrize("old", [False, True], ids=["current daemon", "daemon without sums"])
def test_a_base_proven_by_checksums_is_read_whole_from_a_daemon_that_ignores_them(make_daemon, monkeypatch, old):
    """The reader's tensor was written after its load (its version counter moved): it sends the real
    since_seq and its checksums. A daemon that dropped them must not have its delta applied onto the
    modified copy: the reply does not say the sums were checked, so that tensor is read whole."""
    if old:
        handler = daemon_changes.ChangeMaps.on_changes

        def legacy(self, identity, msg):
            msg.sums, msg.boxes = [], []
            reply = handler(self, identity, msg)
            reply.checked = False  # nor does it know the flag
            return reply

        monkeypatch.setattr(daemon_changes.ChangeMaps, "on_changes", legacy)
    d = make_daemon(change_maps="bfloat16")
    g = torch.Generator().manual_seed(5)
    sds = [first()]
    sds.append(rl_step(sds[0], g))
    dst = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    with StagingClient(d.endpoint, strict=True) as c, Subscriber(d.endpoint) as sub:
        c.stage(sds[0], step=1).wait(10)
        with sub.latest() as snap:
            snap.load_into(dst)
        c.stage(sds[1], step=2).wait(10)
        wait_until(lambda: changed(d, 2))
        dst["tok_embeddings.weight"][3, 3] = 1000.0  # an in-place write: the ledger no longer proves it
        with sub.latest() as snap:
            snap.load_into(dst, since=1)
        expected = full(sub, 2, dst)
    assert [k for k in SHAPES if not torch.equal(dst[k], expected[k])] == []
