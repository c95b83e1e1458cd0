"""Test helper: a scoring worker with this folder on its path reports the Landlock ABI the test sets."""
import os

v = os.environ.get("PYTHON_LANDLOCK_ABI")
if v is not None:
    import jaxrl_llm.environments.landlock as L
    L.abi_version = lambda: int(v)
