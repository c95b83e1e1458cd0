"""The library never imports torch (only tests and benchmarks may)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_does_not_import_torch(tmp_path):
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import jaxrl_llm
        for m in pkgutil.walk_packages(jaxrl_llm.__path__, "jaxrl_llm."):
            importlib.import_module(m.name)
        import jax.numpy as jnp
        from jaxrl_llm import models
        cfg = models.ModelConfig(family="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                                 num_heads=2, num_kv_heads=1, head_dim=4)
        import jax
        p = models.init_params(cfg, jax.random.key(0))
        models.save_pretrained(cfg, p, sys.argv[1])
        models.load_pretrained(sys.argv[1])
        print("torch" in sys.modules)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
