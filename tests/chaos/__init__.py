"""The chaos suite (issue #10): real replicas, real coordinators, random faults, and a
checker that trusts neither the runner nor its ledger — only the fenced oracle's log.

Modules, one job each: :mod:`proxy` (TCP faults), :mod:`coordinators` (servers per
backend), :mod:`nemesis` (seeded fault injection), :mod:`harness` (one campaign),
:mod:`checker` (offline verdict), :mod:`leaks`, :mod:`report` and :mod:`soak`.
"""
