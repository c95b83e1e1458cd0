"""What a user sees of a run's metrics: the console's ETA and TensorBoard's scalar names."""

from __future__ import annotations

import json

from tb_events import read_events

from jaxrl_llm.metrics import MetricsWriter


def test_tensorboard_tags_are_the_metric_names(tmp_path):
    """tensorboardX's `scalar` renamed val_pass@1 to val_pass_1 (and val_maj@4 to val_maj_4): TensorBoard showed
    names that metrics.jsonl, W&B and checkpoint.best_metric do not have."""
    w = MetricsWriter(str(tmp_path), 2)
    w.write(1, {"loss": 0.5, "val_pass@1": 0.25, "val_maj@4": 0.5, "reward/format": 1.0})
    w.close()
    tags = [v.tag for e in read_events(tmp_path / "tensorboard") for v in e.summary.value]
    assert tags == [k for k in json.loads((tmp_path / "metrics.jsonl").read_text()) if k != "step"]
    assert tags == ["loss", "val_pass@1", "val_maj@4", "reward/format"]
