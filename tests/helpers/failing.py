"""A ``call`` target that fails, for error-reporting tests."""

from __future__ import annotations

from singleton.context import JobContext


def boom(ctx: JobContext) -> None:
    raise RuntimeError(f"boom in {ctx.run_id}")
