"""DPO cross-checked against TRL's own DPOTrainer code path on one tiny random Llama.

TRL side: a real `trl.DPOTrainer` (policy + a separate reference model, `precompute_ref_log_probs=False`, no
gradient checkpointing, fp32) built on a small text data set that a word-level tokenizer maps to known ids
("t017" -> 17). One batch comes out of the trainer's own train dataloader (its tokenization, prompt/completion
split and `DataCollatorForPreference`), and `trainer.compute_loss(trainer.model, batch)` gives the loss (its
fused-LM-head sequence log-probs, reference forward and loss formula) and, through `backward()`, the
gradients. jaxrl_llm side: the same ids, attention mask and completion mask (as the loss mask), rearranged
from TRL's [chosen..., rejected...] rows to [P, 2, T], through `algorithms.dpo.make_dpo_loss` on the same
weights loaded with `models.load_pretrained`.

The reference is a perturbed copy of the policy: with reference == policy both losses are log 2 (sigmoid) or
1/(4β²) (IPO) whatever the log-probs, which would check nothing.

What is compared and why:
- sigmoid: TRL's `loss_type="sigmoid"` on summed completion log-probs == ours with `average_log_probs=False`.
- ipo: TRL divides each side's summed log-ratio by its number of completion tokens before the square (see
  its `_compute_loss`), which is ours with `average_log_probs=True` (we average policy and reference
  log-probs by the same count, so the averaged log-ratio is the same number). TRL counts the unshifted
  completion mask, we count target positions (mask[1:]); they agree whenever the prompt is non-empty, as here.
- Conservative DPO (`label_smoothing`; TRL 1.16's "sigmoid" ignores it, "sigmoid" + "robust" weighted to it),
  length-averaged sigmoid (TRL's "sigmoid_norm") and the SFT term (TRL's "sft"): `tests/test_rev31_dpov.py`.
"""

from __future__ import annotations

import copy

import pytest

trl = pytest.importorskip("trl")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hf_models import build_hf_model, tiny_hf_config  # noqa: E402

from jaxrl_llm import models  # noqa: E402
from jaxrl_llm.algorithms.dpo import make_dpo_loss  # noqa: E402

VOCAB = 97
EOS, PAD = 2, 0
# (prompt length, chosen length, rejected length): different lengths so right padding is exercised.
SHAPES = [(5, 4, 7), (9, 6, 3), (3, 8, 8), (7, 2, 5)]


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({_word(i): i for i in range(VOCAB)}, unk_token=_word(1)))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=_word(PAD), eos_token=_word(EOS))


def _word(i: int) -> str:
    """Fixed width: transformers splits special tokens (pad, EOS) out of any word that contains them."""
    return f"t{int(i):03d}"


def _text(ids) -> str:
    return " ".join(_word(i) for i in ids)


def _rows() -> dict[str, list[str]]:
    """Prompt text ends in a space (TRL concatenates prompt + completion strings); completions end in the EOS
    word, so TRL adds none."""
    rng = np.random.default_rng(0)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for lp, lc, lr in SHAPES:
        rows["prompt"].append(_text(rng.integers(3, VOCAB, lp)) + " ")
        rows["chosen"].append(_text([*rng.integers(3, VOCAB, lc - 1), EOS]))
        rows["rejected"].append(_text([*rng.integers(3, VOCAB, lr - 1), EOS]))
    return rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cfg = tiny_hf_config("llama", vocab=VOCAB, layers=2)
    policy = build_hf_model(cfg, seed=0)
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("dpo_trl")
    policy.save_pretrained(root / "policy")
    ref.save_pretrained(root / "ref")
    return str(root / "policy"), str(root / "ref")


def trl_trainer(folders, out_dir, loss_type: str, beta: float):
    """TRL's DPOTrainer on the policy and reference folders and `_rows()`, and its first batch."""
    import datasets

    policy_dir, ref_dir = folders
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(out_dir), beta=beta, loss_type=[loss_type],
                         per_device_train_batch_size=len(SHAPES), max_length=None, precompute_ref_log_probs=False,
                         gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[], seed=0,
                         dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=_word_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict(_rows()))
    return trainer, next(iter(trainer.get_train_dataloader()))


def trl_step(trainer, batch) -> tuple[float, float, dict[str, float]]:
    """TRL's loss on `batch`, its gradient norm and the metrics it logged for it."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None))
    mode = "train" if trainer.model.training else "eval"
    return float(loss.detach()), float(gnorm), {k: v[-1] for k, v in trainer._metrics[mode].items()}


def _trl_loss(folders, tmp_path, loss_type: str, beta: float):
    trainer, batch = trl_trainer(folders, tmp_path, loss_type, beta)
    return (*trl_step(trainer, batch), {k: v.numpy() for k, v in batch.items()})


LOSSES = {"sigmoid": 0.1, "ipo": 0.5}  # loss type -> beta


@pytest.fixture(scope="module")
def trl_runs(folders, tmp_path_factory):
    return {lt: _trl_loss(folders, tmp_path_factory.mktemp(lt), lt, beta) for lt, beta in LOSSES.items()}


@pytest.fixture(scope="module")
def ours(folders, trl_runs):
    """Both loss types in one jitted function (one compile): {loss type: (loss, grad norm, metric means)}."""
    batch = trl_runs["sigmoid"][3]
    for k, v in trl_runs["ipo"][3].items():
        np.testing.assert_array_equal(v, batch[k], err_msg=f"TRL batches differ between runs: {k}")
    dpo = {lt: dict(beta=beta, loss_type=lt, label_smoothing=0.0, average_log_probs=lt == "ipo",
                    preference_weight=1.0, sft_weight=0.0, sft_average_log_probs=False) for lt, beta in LOSSES.items()}
    return our_losses(folders, batch, dpo)


def our_losses(folders, batch, variants: dict[str, dict]) -> dict[str, tuple[float, float, dict[str, float]]]:
    """Our DPO loss on TRL's batch (its rows: chosen 0..P-1, then rejected 0..P-1) for each variant's `dpo`
    settings, all in one jitted function (one compile): {name: (loss, grad norm, metric means)}."""
    _, params = models.load_pretrained(folders[0])
    cfg, ref_params = models.load_pretrained(folders[1])
    P = len(SHAPES)

    def to_pairs(x):  # -> [P, 2, T]
        return np.stack([x[:P], x[P:]], axis=1).astype(np.int32)

    mb = {"input_ids": to_pairs(batch["input_ids"]), "attention_mask": to_pairs(batch["attention_mask"]),
          "loss_mask": to_pairs(batch["completion_mask"])}

    def mean_loss_fn(dpo):
        loss_fn = make_dpo_loss(cfg, ml_collections.ConfigDict(dpo))

        def mean_loss(p):
            total, (pairs, sums) = loss_fn(p, ref_params, mb)
            return total / pairs, {k: v / pairs for k, v in sums.items()}

        return mean_loss

    def all_losses(p):
        out = {}
        for name, dpo in variants.items():
            (loss, metrics), grads = jax.value_and_grad(mean_loss_fn(dpo), has_aux=True)(p)
            out[name] = (loss, optax.global_norm(grads), metrics)
        return out

    out = jax.jit(all_losses)(params)
    return {n: (float(l), float(g), {k: float(v) for k, v in m.items()}) for n, (l, g, m) in out.items()}


def test_trl_batch_is_the_text_rows(trl_runs):
    """TRL built the batch we expect from the text rows: chosen rows first, right padding, completion masks."""
    batch = trl_runs["sigmoid"][3]
    P, rows = len(SHAPES), _rows()
    assert batch["input_ids"].shape == (2 * P, max(lp + max(lc, lr) for lp, lc, lr in SHAPES))
    for half, key, side in ((slice(0, P), "chosen", 1), (slice(P, 2 * P), "rejected", 2)):
        ids, attn, comp = batch["input_ids"][half], batch["attention_mask"][half], batch["completion_mask"][half]
        assert sorted(comp.sum(1)) == sorted(s[side] for s in SHAPES)
        assert sorted(_text(r[m == 1]) + " " for r, m in zip(ids, attn, strict=True)) == sorted(
            p + c + " " for p, c in zip(rows["prompt"], rows[key], strict=True))
        assert sorted(_text(r[m == 1]) for r, m in zip(ids, comp, strict=True)) == sorted(rows[key])


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_dpo_loss_matches_trl_dpo_trainer(trl_runs, ours, loss_type):
    t_loss, t_gnorm, t_metrics, _ = trl_runs[loss_type]
    loss, gnorm, metrics = ours[loss_type]
    beta = LOSSES[loss_type]
    # The reference differs from the policy, so the loss is not the trivial value of policy == reference.
    trivial = np.log(2.0) if loss_type == "sigmoid" else 1.0 / (4 * beta * beta)
    assert abs(t_loss - trivial) > 1e-2
    np.testing.assert_allclose(loss, t_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gnorm, t_gnorm, rtol=1e-4)
    if loss_type == "ipo":
        return  # ours are length-averaged here (average_log_probs=True, accuracy too), TRL's metrics are sums
    # Summed log-probs, rewards (beta * summed log-ratio) and reward accuracy as TRL logs them, means over pairs.
    for ours_key, trl_key in (("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
                              ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("accuracy", "rewards/accuracies")):
        np.testing.assert_allclose(metrics[ours_key], t_metrics[trl_key], atol=1e-4, rtol=1e-5, err_msg=ours_key)
