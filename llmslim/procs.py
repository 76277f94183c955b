"""Whether the process that left a file behind still runs: what lets a writer clean up only dead runs' leftovers."""

from __future__ import annotations

import os


def process_running(pid: int) -> bool:
    """True unless process `pid` of this host is known to have ended (always True where that cannot be checked cheaply)."""
    if os.name != "posix":
        return True  # no cheap liveness check (os.kill(pid, 0) would signal it on Windows): keep the leftovers
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
