"""Bridges from sealed versions into other systems: inference engines that serve the weights.

What lives here: the vLLM weight-transfer backend and its driver (``vllm``). Each bridge is
inert until its system is installed: importing stager, or this package, never imports vLLM.

What it may import: :mod:`stager.protocol`, :mod:`stager.client` and :mod:`stager.consumers`.
Never the daemon's internals (:mod:`stager.daemon`), the CLI or the dev tools (import-linter).
"""
