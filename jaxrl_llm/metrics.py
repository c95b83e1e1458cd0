"""Run metrics: metrics.jsonl (one object per logged step, always with "step") and a console line."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any


class MetricsWriter:
    def __init__(self, workdir: str, max_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._t0 = time.time()
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        elapsed = time.time() - self._t0
        eta = elapsed / max(step, 1) * max(self.max_steps - step, 0)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "step")
        print(f"[step {step}/{self.max_steps}] {shown} | elapsed {elapsed:.0f}s eta {eta:.0f}s", file=sys.stderr,
              flush=True)


def _plain(v: Any) -> Any:
    """Device/numpy scalars to plain Python numbers for JSON."""
    return v.item() if hasattr(v, "item") else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def quiet_libraries() -> None:
    """Orbax and JAX log every checkpoint phase at INFO through absl; keep the console for our own lines."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
