"""Preloaded by tests/test_code_mutants.py into a scoring worker: a thread started at import, before the worker
confines itself, that runs what it is handed (as a library's pool thread can be made to)."""

import queue
import threading

jobs: queue.Queue = queue.Queue()
results: queue.Queue = queue.Queue()


def _serve() -> None:
    while True:
        fn = jobs.get()
        try:
            results.put(repr(fn()))
        except Exception as e:  # noqa: BLE001 (the kind of failure is the result)
            results.put(type(e).__name__)


threading.Thread(target=_serve, daemon=True).start()
