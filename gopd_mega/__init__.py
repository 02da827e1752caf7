"""gopd-mega: Generalized On-Policy Distillation (G-OPD / ExOPD) on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces its pure-torch fallbacks at import time when Apex / Transformer Engine
# are absent (always the case on CPU); the fallbacks are what we intend to use there.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
# ...and a deprecation of its own default cuda_graph_scope, which we never set.
_warnings.filterwarnings("ignore", message=r"full scope is deprecated")
