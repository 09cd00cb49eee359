"""Developer tools: the demo (``demo``), launching a daemon plus a multi-process gloo job (``launch``),
and a lockstep training loop that stages every step (``lockstep``, for the hung-daemon test and campaign).

Used by ``stager demo``, the tests and the benchmarks. May import the client, the loaders and the writers;
starts the daemon only as a subprocess (``python -m stager.cli serve``), never by importing it.
"""
