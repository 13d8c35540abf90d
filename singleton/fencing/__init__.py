"""Fencing guards: the resource's side of the fencing token.

A lease can lie (a paused process does not know its lease expired), so only the resource
can refuse a stale owner's write. A guard runs inside the same transaction as the job's
write: it records the highest token it has accepted per resource and refuses a lower one
(:class:`~singleton.errors.StaleToken`), and, given the run ID, records that the run was
applied and refuses a second application (:class:`~singleton.errors.AlreadyApplied`), so a
takeover after an owner that stalled *after* writing does not write twice. Either refusal
means the caller rolls back its own write with the guard's.
"""
