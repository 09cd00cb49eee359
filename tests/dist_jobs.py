"""Rank functions for real multi-process jobs (spawned; must be importable)."""

import os
import signal
import time

import torch
import torch.distributed as dist


def full_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "fsdp_uneven": torch.randn(7, 5, generator=g),  # Shard(0) over 4 ranks: 2, 2, 2, 1 rows
        "tiny": torch.randn(3, 2, generator=g),  # Shard(0) over 4 ranks: rank 3 holds nothing
        "tp_col": torch.randn(6, 10, generator=g),  # (Replicate, Shard(1)): TP inside HSDP replicas
        "hsdp": torch.randn(9, 3, generator=g),  # (Replicate, Shard(0)), uneven 5 + 4
        "two_d": torch.randn(8, 6, generator=g),  # (Shard(0), Shard(1))
        "strided": torch.randn(8, 4, generator=g),  # (Shard(0), Shard(0)) on a 2-D mesh
        "bf16_rows": torch.randn(5, 4, generator=g).bfloat16(),  # Shard(1) over 4 ranks, uneven
        "repl": torch.randn(4, generator=g),  # Replicate
        "plain": torch.arange(6),  # a plain tensor on every rank
        "scalar": torch.tensor(3.5),
    }


def mixed_layouts(rank, world, endpoint):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stager.client import StagingClient, Subscriber
    from stager.client.admin import daemon_status

    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    full = full_tensors()
    placements = {
        "fsdp_uneven": (mesh1, [Shard(0)]),
        "tiny": (mesh1, [Shard(0)]),
        "tp_col": (mesh2, [Replicate(), Shard(1)]),
        "hsdp": (mesh2, [Replicate(), Shard(0)]),
        "two_d": (mesh2, [Shard(0), Shard(1)]),
        "strided": (mesh2, [Shard(0), Shard(0)]),
        "bf16_rows": (mesh1, [Shard(1)]),
        "repl": (mesh1, [Replicate()]),
    }
    sd = {
        "model": {k: distribute_tensor(full[k], *placements[k]) if k in placements else full[k] for k in full},
        "train": {"step": 1, "names": ["a", "b"], "lr": 0.5},
    }
    client = StagingClient(endpoint, strict=True)
    h = client.stage(sd, step=1)
    assert h.wait_copied() is True
    first = h.wait(60)
    # a layout change between steps: a new tensor, a changed shape, a removed tensor
    full2 = dict(full)
    full2["fsdp_uneven"] = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    full2["new"] = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    del full2["tiny"]
    sd2 = {
        "model": {
            k: distribute_tensor(v, mesh1, [Shard(0)]) if k in ("fsdp_uneven", "new") else sd["model"][k]
            for k, v in full2.items()
        },
        "train": {"step": 2},
    }
    second = client.stage(sd2, step=2).wait(60)
    client.close()
    dist.barrier()
    out = {"first": first, "second": second}
    if rank == 0:
        out["status"] = daemon_status(endpoint)
        with Subscriber(endpoint) as sub:
            for step, expected, objects in (
                (1, full, {"train.step": 1, "train.names": ["a", "b"], "train.lr": 0.5}),
                (2, full2, {"train.step": 2}),
            ):
                with sub.at(step) as snap:
                    assert sorted(snap) == sorted(f"model.{k}" for k in expected), sorted(snap)
                    for k, v in expected.items():
                        got = snap[f"model.{k}"]
                        assert got.dtype == v.dtype and got.shape == v.shape, k
                        assert torch.equal(got, v), f"step {step}: {k} differs"
                    assert snap.objects == objects, snap.objects
    return out


def fsdp_partial_node(rank, world, endpoint):
    """A job of 4 ranks where this 'node' runs 2 of them and the job is not joined (``job=False``):
    the node's snapshot is partial."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(40, dtype=torch.float32).view(8, 5), mesh, [Shard(0)])
    if rank >= 2:  # the other node's ranks have their own daemon; not simulated here
        dist.barrier()
        return None
    client = StagingClient(endpoint, rank=rank, local_world_size=2, world_size=world, strict=True, job=False)
    result = client.stage({"w": w, "b": torch.ones(3)}, step=1).wait(60)
    client.close()
    dist.barrier()
    return result


def die_mid_step(endpoint, rank, width):
    """A rank that stages step 1, then dies mid-copy of step 2. It speaks the protocol as the hook
    does (hello, begin, copy into its region of the daemon's segment, commit), so the test can stop
    it where no hook stops: after writing -7 over its region of step 2's segment, it SIGKILLs itself
    before the commit."""
    from stager.client.connection import Connection
    from stager.protocol import Begin, BeginReply, Commit, Sealed
    from stager.protocol.layout import plan_digest, plan_from_wire
    from stager.protocol.shm import map_segment, placement_view

    plan = plan_from_wire([[f"w{rank}", "f32", [width], [0], [width]]])
    conn = Connection(endpoint, role="trainer", rank=rank, local_world_size=2, world_size=2)
    conn.hello(30)
    assignment = None

    def begin_and_write(step, value):
        nonlocal assignment
        begin = Begin(step=step, digest=plan_digest(plan), plan=plan, full_world=True, shm=True)
        reply = conn.wait_reply(conn.send(begin), 60, f"begin of step {step}", BeginReply)
        assignment = reply.assignment or assignment  # sent with a new layout only
        segment = map_segment(reply.segment, reply.size, writable=True)
        placement_view(segment, torch.float32, assignment[0], plan[0].box.shape).fill_(value)

    begin_and_write(1, float(rank))
    conn.wait_reply(conn.send(Commit(step=1)), 60, "commit of step 1", Sealed)
    begin_and_write(2, -7.0)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def multi_node_placements(world):
    """The mixed layouts of :func:`mixed_layouts` for ranks split over 2 nodes (torchrun order): the
    2-D mesh's dimension 0 runs across nodes, so "hsdp" replicates across nodes and shards inside
    one, "tp_col" is tensor-parallel inside a node, "fsdp_uneven" shards over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    return {
        "fsdp_uneven": (mesh1, [Shard(0)]),
        "tiny": (mesh1, [Shard(0)]),
        "tp_col": (mesh2, [Replicate(), Shard(1)]),
        "hsdp": (mesh2, [Replicate(), Shard(0)]),
        "two_d": (mesh2, [Shard(0), Shard(1)]),
        "strided": (mesh2, [Shard(0), Shard(0)]),
        "bf16_rows": (mesh1, [Shard(1)]),
        "repl": (mesh1, [Replicate()]),
    }


def scaled(full, step):
    return {k: v * step if v.is_floating_point() else v + step for k, v in full.items()}


def multi_node_stage(rank, world, steps):
    """Stage ``steps`` of the mixed layouts from a job spanning nodes (each rank's daemon from
    STAGER_ENDPOINT); rank 0 then reads the newest through its own node's daemon."""
    from torch.distributed.tensor import distribute_tensor

    from stager.client import StagingClient, Subscriber

    placements = multi_node_placements(world)
    client = StagingClient(strict=True)
    results = []
    for step in steps:
        full = scaled(full_tensors(), step)
        sd = {
            "model": {k: distribute_tensor(v, *placements[k]) if k in placements else v for k, v in full.items()},
            "train": {"step": step},
        }
        results.append(client.stage(sd, step=step).wait(60))
    client.close()
    dist.barrier()
    out = {"sealed": results, "job": client.job.job if client.job else None}
    if rank == 0:
        with Subscriber() as sub, sub.latest() as snap:
            expected = scaled(full_tensors(), steps[-1])
            assert snap.step == steps[-1] and sorted(snap) == sorted(f"model.{k}" for k in expected)
            for k, v in expected.items():
                assert torch.equal(snap[f"model.{k}"], v), k
            assert snap.objects == {"train.step": steps[-1]}
            out["job_seen"] = sub.job
    dist.barrier()
    return out


LLAMA_CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LLAMA_INFO = {"adapter": "llama3", "hf_config": LLAMA_CONFIG}


def llama_full(step):
    """A torchtitan-style Llama state (odd row counts: FSDP shards are uneven over 3 ranks)."""
    g = torch.Generator().manual_seed(step)
    shapes = {"tok_embeddings.weight": (96, 32), "norm.weight": (32,), "output.weight": (96, 32)}
    for i in range(2):
        shapes.update(
            {
                f"layers.{i}.attention.wq.weight": (32, 32),
                f"layers.{i}.attention.wk.weight": (16, 32),
                f"layers.{i}.attention.wv.weight": (16, 32),
                f"layers.{i}.attention.wo.weight": (32, 32),
                f"layers.{i}.attention_norm.weight": (32,),
                f"layers.{i}.ffn_norm.weight": (32,),
                f"layers.{i}.feed_forward.w1.weight": (48, 32),
                f"layers.{i}.feed_forward.w2.weight": (32, 48),
                f"layers.{i}.feed_forward.w3.weight": (48, 32),
            }
        )
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def stage_fsdp_llama(rank, world, steps, signal_dir=None):
    """FSDP (Shard(0) over every rank of every node) of :func:`llama_full`, one version per step.
    With ``signal_dir``: after the first step, wait for the file ``go`` there before the next ones
    (the test restarts a node's daemon in between)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient
    from stager.protocol import StagerError

    mesh = init_device_mesh("cpu", (world,))
    client = StagingClient(strict=True, timeout=30)
    sealed = []
    for i, step in enumerate(steps):
        if i == 1 and signal_dir:
            open(os.path.join(signal_dir, f"staged-{rank}"), "w").close()
            while not os.path.exists(os.path.join(signal_dir, "go")):
                time.sleep(0.05)  # waiting for the test's signal, not a proof of anything
        sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in llama_full(step).items()}
        handle = client.stage(sd, step=step, model_info=LLAMA_INFO)
        try:
            sealed.append(handle.wait(60))
        except StagerError as exc:
            if not signal_dir or i == 0:
                raise
            # the first stage after the daemon's restart may find the old connection's loss only
            # then (a training loop skips that step); the steps after it must seal
            sealed.append({"step": step, "error": str(exc)})
    client.close()
    dist.barrier()
    return sealed


def stage_replicated(rank, world, steps):
    """HSDP with whole replicas on every node (Replicate across nodes, Shard(0) inside), plus
    ``fsdp.w`` sharded across every rank when ``steps`` says so (``"fsdp"``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stager.client import StagingClient

    mesh2 = init_device_mesh("cpu", (2, world // 2))
    mesh1 = init_device_mesh("cpu", (world,))
    client = StagingClient(strict=True)
    for step, fsdp in steps:
        full = scaled(full_tensors(), step)
        sd = {
            "hsdp": distribute_tensor(full["hsdp"], mesh2, [Replicate(), Shard(0)]),
            "two": distribute_tensor(full["tp_col"], mesh2, [Replicate(), Shard(1)]),
        }
        if fsdp:
            sd["fsdp"] = distribute_tensor(full["fsdp_uneven"], mesh1, [Shard(0)])
        client.stage(sd, step=step).wait(60)
    client.close()
    dist.barrier()


def _cli_json(*argv):
    """``stager ARGV --json`` in this rank's process (its process group is the writers'): the line it printed."""
    import contextlib
    import io
    import json

    from stager.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--json"]) == 0
    (line,) = printed.getvalue().splitlines()
    return json.loads(line)


def dcp_node_writer(rank, world, out):
    """One `write-dcp --distributed` writer per node (its node's daemon from STAGER_ENDPOINT): its --json line."""
    return _cli_json("write-dcp", "--distributed", "--out", out)


def load_dcp_sharded(rank, world, path, expected_step):
    """Load a DCP checkpoint of :func:`multi_node_stage`'s step into DTensors sharded over ``world``
    ranks (another world size than the job's) and compare with the unsharded state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    expected = {f"model.{k}": v for k, v in scaled(full_tensors(), expected_step).items()}
    template = {
        k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) if v.dim() else torch.zeros_like(v)
        for k, v in expected.items()
    }
    template["train.step"] = -1
    dcp.load(template, checkpoint_id=path)
    for k, v in expected.items():
        got = template[k].full_tensor() if hasattr(template[k], "full_tensor") else template[k]
        assert torch.equal(got, v), k
    return template["train.step"]


def hf_node_exporter(rank, world, out, max_shard_size):
    """One `export-hf --distributed` exporter per node: its --json line."""
    return _cli_json("export-hf", "--distributed", "--out", out, "--max-shard-size", max_shard_size)


def _fsdp_mlp(seed, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))  # 33 and 7 rows: uneven shards
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 16)).sum().backward()  # one step: the optimizer state exists
    opt.step()
    opt.zero_grad()
    return model, opt


def _train_state(model, opt, train):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=flat),
        "train": train,
    }


def _full(sd):
    """The unsharded tensors, as numpy arrays: a tensor returned through run_ranks' queue would be
    shared by file descriptor with a rank that exits right after (the parent then waits forever)."""
    out = {}
    for group in ("model", "optim"):
        for k, v in sd[group].items():
            if isinstance(v, torch.Tensor):
                out[f"{group}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().numpy()
    return out


def stage_fsdp_train_state(rank, world):
    """FSDP2 model and AdamW state after one step, staged as step 7 with the train state."""
    from stager.client import StagingClient

    model, opt = _fsdp_mlp(0, world)
    sd = _train_state(model, opt, {"step": 7, "data": {"epoch": 1, "position": 1234}})
    with StagingClient(strict=True) as client:
        client.stage(sd, step=7).wait(60)
    return _full(sd)


def restore_fsdp_train_state(rank, world):
    """Another model (other seed, other world size) restored from the newest version in place."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from stager.client import StagingClient

    model, opt = _fsdp_mlp(rank + 100, world)
    sd = _train_state(model, opt, {"step": 0, "data": {"epoch": 0, "position": 0}})
    with StagingClient(strict=True) as client:
        step = client.restore(sd)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=StateDictOptions(flatten_optimizer_state_dict=True))
    after = _full(_train_state(model, opt, sd["train"]))  # read back from the live model and optimizer
    return step, sd["train"], after


def _batch(step, world, rank):
    """Step ``step``'s global batch (the same for any world size), this rank's rows of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(12, 16, generator=g), torch.randn(12, 7, generator=g)
    rows = 12 // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def train_with_staging(rank, world, phase, steps, crash_after=None):
    """FSDP2 training staging every step; ``phase``: "fresh" starts from seed 0, "resume" restores
    the newest version first (another init: only the restore makes it equal). With ``crash_after``
    every rank is killed with SIGKILL in the middle of the step after it (its forward done)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from stager.client import StagingClient

    model, opt = _fsdp_mlp(0 if phase == "fresh" else 55, world)  # (one throwaway step inside)
    client = StagingClient(strict=True)
    start = 0
    if phase == "resume":
        sd = _train_state(model, opt, {"step": -1})
        start = client.restore(sd)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"], options=StateDictOptions(flatten_optimizer_state_dict=True))
        assert sd["train"]["step"] == start
    losses = {}
    for step in range(start + 1, start + 1 + steps):
        x, y = _batch(step, world, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if crash_after is not None and step == crash_after + 1:
            dist.barrier()  # every rank's forward done: all of them die mid-step
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step: forward done, nothing staged
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses[step] = (total / world).item()
        client.stage(_train_state(model, opt, {"step": step}), step=step).wait(60)
    client.close()
    return losses


def restore_model_as_tp(rank, world):
    """The staged FSDP2 model restored into another parallelism: 2D weights column-sharded
    (``Shard(1)``, uneven), 1D ones replicated, on ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(77)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7)).state_dict()
    sd = {
        "model": {k: distribute_tensor(v, mesh, [Shard(1) if v.dim() == 2 else Replicate()]) for k, v in plain.items()}
    }
    with StagingClient(strict=True) as client:
        step = client.restore(sd)
    return step, {f"model.{k}": v.full_tensor().numpy() for k, v in sd["model"].items()}


def restore_with_one_bad_rank(rank, world):
    """Rank 1's state dict does not match the version: every rank must fail, none restore."""
    from stager.client import StagingClient
    from stager.protocol import StagerError

    with StagingClient(strict=True) as client:
        client.stage({"w": torch.ones(4, 4)}, step=1).wait(60)
        sd = {"w": torch.zeros(4, 4) if rank != 1 else torch.zeros(4, 5)}
        try:
            client.restore(sd)
        except StagerError as exc:
            return exc.code.value, exc.message, bool(sd["w"].any())
    return None


def restore_multi_node(rank, world):
    """A restarted multi-node job (other world size: Shard(0) over every rank) restoring the newest
    complete version of the job it continues (the same STAGER_JOB_ID)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient

    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "model": {
            k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) if v.dim() else torch.zeros_like(v)
            for k, v in full_tensors().items()
        },
        "train": {"step": -1},
    }
    with StagingClient(strict=True) as client:
        step = client.restore(sd)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float().numpy() for k, v in sd["model"].items()}
    return step, sd["train"], full


def stage_through_a_hung_daemon(rank, world, endpoint, control_dir):
    """A training loop in lockstep (:func:`stager.dev.lockstep.lockstep_stages`) until the file
    ``done`` appears in ``control_dir`` (the test stops and continues the daemon meanwhile). Each
    step is appended to ``rank<r>.jsonl`` there as it ends: step, start time, seconds in
    stage()+wait_copied(), outcome."""
    import json

    from stager.client import StagingClient
    from stager.dev.lockstep import lockstep_stages
    from stager.protocol import StagerError

    client = StagingClient(endpoint, timeout=30.0, seal_timeout=60.0)
    sd = {f"w{rank}": torch.zeros(1 << 12)}
    steps = 0
    with open(os.path.join(control_dir, f"rank{rank}.jsonl"), "a") as out:
        for s in lockstep_stages(client, sd, sd[f"w{rank}"], control_dir):
            steps = s.step
            try:
                sealed = s.copied and s.handle.wait(90)["step"] == s.step
            except StagerError:
                sealed = False
            error = s.error or s.handle.error
            code = error.code.value if error is not None else None
            out.write(
                json.dumps(
                    {
                        "step": s.step,
                        "t": s.t,
                        "stall": s.stall,
                        "copied": s.copied,
                        "sealed": sealed,
                        "skipped": code == "no_sign_of_life",
                        "code": code,
                    }
                )
                + "\n"
            )
            out.flush()
            time.sleep(0.02)  # the rest of the training step (pacing, not a check)
    stats = client.stats
    client.close()
    return {"stats": stats, "steps": steps}


def rl_chain(n, seed=7):
    """``n`` full states of :func:`llama_full`'s model as an RL run makes them: every fp32 element
    moves a little (mostly below bf16's precision), 2% of them past a bf16 ulp; norms stay."""
    g = torch.Generator().manual_seed(seed)
    sd = llama_full(1)
    out = [sd]
    for _ in range(n - 1):
        nxt = {}
        for k, v in sd.items():
            t = v.clone()
            if not k.endswith("norm.weight"):
                t += torch.randn(t.shape, generator=g) * 1e-6
                t[torch.rand(t.shape, generator=g) < 0.02] += 0.05
            nxt[k] = t
        out.append(nxt)
        sd = nxt
    return out


def stage_rl_chain(rank, world, steps, signal_dir=None, pause_after=1):
    """FSDP (Shard(0) over every rank of every node) of :func:`rl_chain`'s states, step s staging
    state s-1. With ``signal_dir``: after ``pause_after`` steps, say so (file ``staged-<rank>``) and
    wait for the file ``go`` there (the test restarts a node's daemon meanwhile); the first step
    after it may fail (a training loop skips it), the later ones must seal."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager.client import StagingClient
    from stager.protocol import StagerError

    mesh = init_device_mesh("cpu", (world,))
    chain = rl_chain(max(steps))
    client = StagingClient(strict=True, timeout=30)
    sealed = []
    for i, step in enumerate(steps):
        if signal_dir and i == pause_after:
            open(os.path.join(signal_dir, f"staged-{rank}"), "w").close()
            while not os.path.exists(os.path.join(signal_dir, "go")):
                time.sleep(0.05)  # waiting for the test's signal, not a proof of anything
        sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in chain[step - 1].items()}
        try:
            sealed.append(client.stage(sd, step=step).wait(60))
        except StagerError as exc:
            if not signal_dir or i != pause_after:
                raise
            sealed.append({"step": step, "error": str(exc)})
    client.close()
    dist.barrier()
    return sealed
