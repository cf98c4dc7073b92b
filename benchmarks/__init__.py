"""Speed and memory benchmarks of kalmannorm's layers, outside the installed package.

Run from the repository root: ``python -m benchmarks --quick`` (or ``make bench``).
"""
