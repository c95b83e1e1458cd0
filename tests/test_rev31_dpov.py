"""The DPO variants `tests/test_dpo_trl.py` leaves out, pinned against TRL 1.16's own `DPOTrainer.compute_loss` on
the same tiny Llama, pairs and batch (its fixtures and word-level tokenizer), fp32.

One TRL trainer is built; its loss is switched between calls through the attributes `_compute_loss` reads
(`loss_types`, `loss_weights`, `label_smoothing`), so each variant is TRL's formula on TRL's log-probs.
- conservative DPO (our `label_smoothing` ε on "sigmoid"): TRL 1.16's "sigmoid" ignores `label_smoothing`; its
  "robust" loss is ((1-ε) A - ε B) / (1-2ε) with A = -log σ(βh), B = -log σ(-βh), so "sigmoid" weighted 2(1-ε) plus
  "robust" weighted -(1-2ε) is (1-ε) A + ε B, the cDPO loss (TRL < 1.0's "sigmoid" with label_smoothing).
- length-averaged sigmoid (our `average_log_probs=True`): TRL's "sigmoid_norm".
- SFT term: TRL's "sft" (its former `rpo_alpha`) is the chosen tokens' NLL averaged over all chosen tokens of the
  batch; ours (`sft_average_log_probs=False`) is each chosen response's summed NLL averaged over pairs, so TRL's =
  ours x pairs / chosen tokens (the README says so); with `sft_average_log_probs=True` each response is averaged
  over its own tokens first, which equals TRL's only when every chosen response has one length.
- metrics: rewards/margins (and the rest) on summed log-probs.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

import numpy as np  # noqa: E402
from test_dpo_trl import SHAPES, folders, our_losses, trl_step, trl_trainer  # noqa: E402,F401  (folders: a fixture)

BETA, EPS, ALPHA = 0.1, 0.2, 0.7
# name -> (TRL loss types, TRL loss weights, TRL label_smoothing, our dpo overrides)
VARIANTS = {
    "cdpo": (["sigmoid", "robust"], [2 * (1 - EPS), -(1 - 2 * EPS)], EPS, dict(label_smoothing=EPS)),
    "sigmoid_avg": (["sigmoid_norm"], [1.0], 0.0, dict(average_log_probs=True)),
    "sft_only": (["sft"], [1.0], 0.0, dict(preference_weight=0.0, sft_weight=1.0)),
}


@pytest.fixture(scope="module")
def trl_runs(folders, tmp_path_factory):  # noqa: F811
    trainer, batch = trl_trainer(folders, tmp_path_factory.mktemp("trl"), "sigmoid", BETA)
    out = {}
    for name, (types, weights, smoothing, _) in VARIANTS.items():
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = types, weights, smoothing
        out[name] = trl_step(trainer, batch)
    return out, {k: v.numpy() for k, v in batch.items()}


@pytest.fixture(scope="module")
def ours(folders, trl_runs):  # noqa: F811
    base = dict(beta=BETA, loss_type="sigmoid", label_smoothing=0.0, average_log_probs=False,
                preference_weight=1.0, sft_weight=0.0, sft_average_log_probs=False)
    return our_losses(folders, trl_runs[1], {name: {**base, **overrides}
                                             for name, (*_, overrides) in VARIANTS.items()})


def test_conservative_dpo_matches_trl(trl_runs, ours):
    t_loss, t_gnorm, t_metrics = trl_runs[0]["cdpo"]
    loss, gnorm, metrics = ours["cdpo"]
    np.testing.assert_allclose(loss, t_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gnorm, t_gnorm, rtol=1e-4)
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies")):
        np.testing.assert_allclose(metrics[ours_key], t_metrics[trl_key], atol=1e-5, rtol=1e-5, err_msg=ours_key)


def test_length_averaged_sigmoid_is_trl_sigmoid_norm(trl_runs, ours):
    t_loss, t_gnorm, _ = trl_runs[0]["sigmoid_avg"]
    loss, gnorm, _ = ours["sigmoid_avg"]
    assert abs(t_loss - np.log(2.0)) > 1e-4  # not the trivial value
    np.testing.assert_allclose(loss, t_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gnorm, t_gnorm, rtol=1e-4)


def test_sft_term_is_trl_sft_up_to_its_token_normalisation(trl_runs, ours):
    """TRL's "sft" averages the NLL over the batch's chosen tokens, ours sums each response and averages over
    pairs: the same per-token log-probs, scaled by pairs / chosen tokens (loss and gradients alike)."""
    t_loss, t_gnorm, _ = trl_runs[0]["sft_only"]
    loss, gnorm, metrics = ours["sft_only"]
    P = len(SHAPES)
    scale = P / sum(c for _, c, _ in SHAPES)  # chosen tokens: the completion masks' counts
    assert scale != 1.0
    np.testing.assert_allclose(metrics["sft_loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(loss * scale, t_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gnorm * scale, t_gnorm, rtol=1e-4)
