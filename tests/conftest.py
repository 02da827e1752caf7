"""Test-session set-up shared by every test module.

Without a GPU, Triton kernels run only in its interpreter, and triton reads TRITON_INTERPRET
when it is first imported (megatron-core and transformers import it during collection), so the
flag is set here, before any test module is imported. On GPU machines nothing changes.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers by name
