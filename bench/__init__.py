"""Benchmarks for singleton: ``python -m bench`` (or ``make bench``) starts its own servers,
measures, prints tables and writes them to ``docs/benchmarks.md``.

Every figure is measured against baselines in the same run, because the machines this runs
on are shared and noisy: a ratio to a floor taken a second earlier means more than an
absolute number from another day.
"""
