"""polykit client: cache keys, artifacts, and the remote cache backend."""

import time

__version__ = "0.1.0"
STARTED = time.perf_counter()  # for POLYKIT_PROFILE's start-up figure (timing.py)
