"""Consumers that write sealed versions out: clients of the daemon like any reader.

What lives here: the HF exporter (``export_hf``, one writer per node in ``export_hf_dist``, LoRA
adapters in ``export_peft``), the DCP writer (``write_dcp``, per node in ``write_dcp_dist``), what
the per-node writers share (``node_writers``: one step published once every node wrote its part),
and what every writer shares (``persist``: following versions, atomic step directories, retention).

What it may import: :mod:`stager.protocol`, :mod:`stager.client` and :mod:`stager.formats`.
Never the loaders, the daemon's internals, the CLI or the dev tools (import-linter).
"""
