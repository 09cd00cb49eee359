"""Helpers shared by several test modules (test modules never import each other)."""

import socket
import time

# a tiny Llama-family HF config used by the adapter and export tests
CONFIG = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 64, "tie_word_embeddings": False}


class EagerPlugin:  # torchtitan's StateDictAdapter shape, loaded by module:attr
    def __init__(self, hf_config):
        self.prefix = hf_config.get("prefix", "hf.")

    def to_hf(self, state_dict):
        return {self.prefix + k: v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict):
        return {k[len(self.prefix):]: v for k, v in hf_state_dict.items()}


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
