"""Producers of versions: what puts a state dict into the daemon without a training job.

What lives here: ``load-hf`` (``load_hf``: an HF checkpoint, adapted to the trainer's names) and
``load-dcp`` (``load_dcp``), both over one ingest session (``ingest``: a plan, a segment filled
from files, a seal, as a training rank would), and full assembly (``assemble_full``: a multi-node
version made whole on one node).

What it may import: :mod:`stager.protocol`, :mod:`stager.client` and :mod:`stager.formats`.
Never the writers, the daemon's internals, the CLI or the dev tools (import-linter).
"""
