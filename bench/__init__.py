"""Benchmarks: `python -m bench.generate | bench.latency | bench.train [--smoke]`.

Each prints its table last and writes the same rows, with the machine and versions, to a JSON file
(`bench/results/<name>.json` unless `--out` says otherwise; a `--smoke` run's goes to a temporary folder).
Results are collected in BENCHMARKS.md.
"""
