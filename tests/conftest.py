import os
import sys

# Tests run on the CPU with one device in the main process; multi-device cases start subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
