"""Consumers of sealed versions, built on the client: they are clients of the daemon like any reader.

What lives here: the HF exporter (``export_hf``), the DCP writer (``write_dcp``), what every
writer shares (``persist``: following versions, atomic step directories, retention), the
streaming safetensors writer (``safetensors_io``) and export checksums (``integrity``).

What it may import: :mod:`stager.protocol` and :mod:`stager.client`. Never the daemon's
internals (:mod:`stager.daemon`), the CLI or the dev tools (checked by import-linter in CI).
"""
