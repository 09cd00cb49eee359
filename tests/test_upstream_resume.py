"""The README's training-loop and restore calls on torchtitan 0.3.0's own models, FSDP2 on 2 gloo ranks:
Llama 3 (its fused QKV: ``get_model_state_dict`` raises ``AttributeError: 'FusedQKVLinear' object has no
attribute 'wq'`` on it, ``model.state_dict()`` works) and DeepSeek-V3 (grouped experts, a plain-tensor
buffer), each from torchtitan's own debugmodel flavor.

A job stages steps 1..2 with the README's calls and trains on to step 4; a new job (another init) restores
the newest version the README's way and trains steps 3..4. The restored state is the staged one, and the
losses and the final model and optimizer state are the uninterrupted job's, bit for bit. The staged
version's HF view (its model_info) is torchtitan's own StateDictAdapter.to_hf of the model.

Skips without torchtitan (``bash .ci/run`` installs it); torchtitan is imported only in the ranks.
"""

import re
from pathlib import Path

import pytest

import upstream_jobs
from stager.dev.launch import DaemonProcess, run_ranks

ROOT = Path(__file__).resolve().parents[1]

# what upstream_jobs.train calls, as the README's code shows it
README_CALLS = (
    '"model": model.state_dict()',
    '"optim": get_optimizer_state_dict(model, optimizer, options=flat)',
    "handle.wait_copied()",
    "step = client.restore(sd)",
    'model.load_state_dict(sd["model"])',
    'set_optimizer_state_dict(model, optimizer, sd["optim"], options=flat)',
    'start = sd["train"]["step"] + 1',
)


def test_the_readme_shows_the_calls_the_torchtitan_jobs_make():
    code = "\n".join(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL))
    assert [call for call in README_CALLS if call not in code] == []


@pytest.mark.parametrize("name", ["llama3", "deepseek_v3"])
def test_torchtitan_model_staged_and_restored_the_readme_way_continues_bit_for_bit(name):
    pytest.importorskip("torchtitan")
    with DaemonProcess(args=("--memory-limit", "1GiB")) as daemon:  # the daemon outlives the first job
        env = {"STAGER_ENDPOINT": daemon.endpoint}
        fresh = run_ranks(upstream_jobs.train, 2, name, "fresh", env=env, timeout=400)[0]
        resumed = run_ranks(upstream_jobs.train, 2, name, "resume", env=env, timeout=400)[0]
    if name == "llama3":  # torchtitan 0.3.0's fused QKV, split by its state-dict hook, went through
        assert "layers.0.attention.qkv_linear.wq.weight" in fresh["names"]
    else:
        assert "layers.1.moe.routed_experts.inner_experts.w1_EFD" in fresh["names"]
    assert fresh["hf_mismatches"] == []
    assert resumed["restored_step"] == upstream_jobs.STAGED_UNTIL
    staged, restored = fresh["staged"], resumed["restored"]
    assert sorted(restored) == sorted(staged)
    assert [k for k in staged if restored[k] != staged[k]] == []
    after = range(upstream_jobs.STAGED_UNTIL + 1, upstream_jobs.STEPS + 1)
    assert resumed["losses"] == {s: fresh["losses"][s] for s in after}  # bit for bit
    assert [k for k in fresh["final"] if resumed["final"][k] != fresh["final"][k]] == []
