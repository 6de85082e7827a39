"""virtcontainers' benchmarks: ``python -m bench`` runs every figure, each against a baseline
measured in the same run, with the peers beside us (see docs/performance.md).

The modules are also runnable one by one (``python -m bench.sandbox`` ...); their measurement
functions are what the runner in ``bench/__main__.py`` calls.
"""
