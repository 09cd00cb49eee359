"""On-disk checkpoint formats, read and written safely: no daemon, no reader, no version in sight.

What lives here: reading HF safetensors checkpoints (``hf_checkpoint``), DCP checkpoints without
unpickling anything but DCP's metadata classes (``safe_dcp``), the streaming safetensors writer
(``safetensors_io``), and export manifests with per-tensor checksums, ``verify`` and ``diff``
(``integrity``). Loaders read through it, writers write through it.

What it may import: :mod:`stager.protocol` only (import-linter, tests/test_architecture.py).
"""
