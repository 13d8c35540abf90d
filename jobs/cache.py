"""A cache refresh: the ``efficiency`` mode.

Why ``efficiency``: refreshing a cache twice is harmless, only wasteful. The lock keeps the
fleet from doing the same work on every replica; when the lock is busy the firing is simply
skipped, with no waiting, because the next firing will refresh the cache anyway. No fencing
is needed: a stale refresh writes data that was true a moment ago.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import singleton

#: Where the example writes its cache; next to this file unless CACHE_FILE says otherwise.
CACHE = Path(os.environ.get("CACHE_FILE", Path(__file__).resolve().parent / "cache.json"))


@singleton.job(every="10s", mode="efficiency", lock_ttl="10s")
def refresh_cache(ctx: singleton.JobContext) -> None:
    """Rebuild the cache file atomically (write aside, then rename)."""
    fresh = {"refreshed_at": time.time(), "run_id": ctx.run_id, "by": ctx.replica_id}
    aside = CACHE.with_suffix(".tmp")
    aside.write_text(json.dumps(fresh))
    aside.replace(CACHE)
