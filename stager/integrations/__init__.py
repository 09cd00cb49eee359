"""Bridges from sealed versions into other systems: inference engines that serve the weights.

What lives here: the vLLM weight-transfer backend and its driver (``vllm``). Each bridge is
inert until its system is installed: importing stager, or this package, never imports vLLM.

What it may import: :mod:`stager.protocol`, :mod:`stager.client` and :mod:`stager.formats`. Never
the loaders, the writers, the daemon's internals, the CLI or the dev tools (import-linter).
"""
