"""The top-level ``kernels`` package is ours, light, and not mistaken for HF's hub ``kernels``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
import kernels
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("gopd_mega", "megatron", "sglang", "transformers"))
import importlib.metadata
try:
    dist_version = importlib.metadata.version("kernels")  # HF's distribution; ours is gopd-mega
except importlib.metadata.PackageNotFoundError:
    dist_version = None
hf_available = None
try:
    from transformers.utils import import_utils
    fn = getattr(import_utils, "is_kernels_available", None)
    if fn is not None:
        hf_available = bool(fn())
except ImportError:
    pass
print(json.dumps({"heavy": heavy, "marker": getattr(kernels, "__gopd_mega_kernels__", None),
                  "file": kernels.__file__, "triton_loaded": "triton" in sys.modules,
                  "hf_kernels_available": hf_available,
                  "dist_version": dist_version}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_ours_and_light():
    info = _probe()
    # only what `import kernels` itself pulled in (transformers is imported after the check)
    assert info["heavy"] == [], info["heavy"]
    assert info["marker"] is True
    assert Path(info["file"]).resolve().is_relative_to(REPO)
    assert info["triton_loaded"] is False  # triton is imported lazily, by the triton backend


def test_transformers_does_not_take_ours_for_hf_kernels():
    info = _probe()
    assert info["dist_version"] is None  # no distribution named "kernels" behind our package
    if info["hf_kernels_available"] is None:
        import pytest

        pytest.skip("transformers.utils.import_utils.is_kernels_available not present")
    assert info["hf_kernels_available"] is False
