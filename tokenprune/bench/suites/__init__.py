"""Benchmark suites run by ``tokenprune-bench``: one module per suite, imported only when chosen.

Suites measure through :mod:`tokenprune.bench.timing` and report through
:mod:`tokenprune.bench.results` / :mod:`tokenprune.bench.report`, so every suite's rows carry the
same columns. The repository's ``benchmarks/`` folder holds only scripts that call them and the
committed results. Each suite's own command line checks its output paths with
:func:`tokenprune.bench.report.check_outputs_or_exit` before measuring (``--force`` to overwrite).
"""
