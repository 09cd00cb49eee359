"""Helpers shared by several test modules (test modules never import each other)."""

import importlib
import importlib.util
import socket
import time

import pytest

# a tiny Llama-family HF config used by the adapter and export tests
CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

# the torchtitan names and shapes of a one-layer Llama of the readers' tests (llama3 adapter, hidden 32, vocab 96)
ONE_LAYER_LLAMA = {
    "tok_embeddings.weight": (96, 32),
    "layers.0.attention.wq.weight": (32, 32),
    "layers.0.attention.wk.weight": (16, 32),
    "layers.0.attention.wv.weight": (16, 32),
    "layers.0.attention.wo.weight": (32, 32),
    "layers.0.attention_norm.weight": (32,),
    "layers.0.ffn_norm.weight": (32,),
    "layers.0.feed_forward.w1.weight": (48, 32),
    "layers.0.feed_forward.w2.weight": (32, 48),
    "layers.0.feed_forward.w3.weight": (48, 32),
    "norm.weight": (32,),
    "output.weight": (96, 32),
}


class EagerPlugin:  # torchtitan's StateDictAdapter shape, loaded by module:attr
    def __init__(self, hf_config):
        self.prefix = hf_config.get("prefix", "hf.")

    def to_hf(self, state_dict):
        return {self.prefix + k: v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict):
        return {k[len(self.prefix) :]: v for k, v in hf_state_dict.items()}


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes (AssertionError).
    A wait for a state the test then asserts, never a sleep standing in for it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def has_ipv6_loopback() -> bool:
    """Whether this host can bind ::1 (IPv6 tests skip cleanly where it cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class _Lazy:
    """A module, or one of its attributes, imported at its first use (see :func:`lazy_importorskip`)."""

    def __init__(self, module: str, attr: str | None = None):
        self._module, self._attr = module, attr

    def _resolve(self):
        module = importlib.import_module(self._module)
        return module if self._attr is None else getattr(module, self._attr)

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # pytest's collection probes __test__, __bases__ ...
            raise AttributeError(attr)  # of every name in a module: answered here, without the import
        return getattr(self._resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._module}{'.' + self._attr if self._attr else ''}, imported at first use>"


def lazy_import(module: str, attr: str | None = None):
    """``module`` (or ``module.attr``), imported when a test first uses it: for a name a test module binds at
    its top, as ``from module import attr`` would, without the import while pytest collects it."""
    return _Lazy(module, attr)


def lazy_importorskip(name: str):
    """``pytest.importorskip(name)`` at the top of a test module, without importing ``name`` there: the module
    is skipped when ``name``'s package is not installed, and ``name`` is imported at its first use, in a test.
    pytest imports every test module to collect it (``-m fast`` too), and transformers, torchtitan, peft and
    torchao take seconds each to import."""
    package = name.partition(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)
    return _Lazy(name)


def vllm_per_block_cast_to_fp8(x, block_size=(128, 128)):
    """The reference FP8 block quantizer, independent of stager's: a literal transcription, operation for
    operation, of ``per_block_cast_to_fp8(x, block_size, use_ue8m0=False)`` in vLLM's
    ``vllm/utils/deep_gemm.py`` (https://github.com/vllm-project/vllm, commit
    00620f91ea186ca295a1eb69f4acba9d0efaaaaa, Apache-2.0), which vLLM took from DeepGEMM's
    ``deep_gemm/utils/math.py`` (https://github.com/deepseek-ai/DeepGEMM/blob/dd6ed14acbc7445dcef224248a77ab4d22b5f240/
    deep_gemm/utils/math.py#L38, MIT; unchanged at DeepGEMM commit 38939a4c494ce6e904b54da94a1183955a5e9497).
    Returns ``(e4m3 data, fp32 scale_inv)``."""
    import torch

    assert x.dim() == 2
    m, n = x.shape
    block_m, block_n = block_size
    x_padded = torch.zeros((-(-m // block_m) * block_m, -(-n // block_n) * block_n), dtype=x.dtype, device=x.device)
    x_padded[:m, :n] = x
    x_view = x_padded.view(-1, block_m, x_padded.size(1) // block_n, block_n)
    x_amax = x_view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = x_amax / 448.0
    x_scaled = (x_view * (1.0 / sf)).to(torch.float8_e4m3fn)
    return x_scaled.view_as(x_padded)[:m, :n].contiguous(), sf.view(x_view.size(0), x_view.size(2))
