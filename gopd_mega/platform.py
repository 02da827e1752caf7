"""The one place that knows whether we run on GPUs or on CPUs.

megatron-core is written for CUDA + NCCL. With the redirections below it also runs (fp32, and
bf16/fp16 with fp32 master weights) on CPU processes talking over gloo (tests, CI, the laptop
demo). ``setup_platform()`` applies them only when CUDA is unavailable; on GPU machines it does
nothing and megatron runs untouched.
No other module branches on CPU vs GPU: they call ``device()`` and ``init_distributed()``.

CUDA-only spots of megatron-core 0.16.1 (same code in 0.19) and what each patch does:

1. tensor_parallel/random.py: the RNG tracker (used by attention dropout even at p=0, and by
   ``model_parallel_cuda_manual_seed``) reads/writes ``torch.cuda`` RNG states. On CPU it tracks
   the CPU generator's state instead.
2./3. ``device=torch.cuda.current_device()`` is written inline in tensor_parallel/layers.py,
   mappings.py, attention.py, the RoPE module (which even moves ``inv_freq`` to that device in
   forward), the global memory buffer and p2p_communication.py. ``torch.cuda.current_device``
   returns the CPU device instead (without CUDA the original can only raise).
4. pipeline_parallel/schedules.py builds ``torch.zeros(..., device="cuda")`` for the token
   counter, and transformer/utils.py builds the default causal mask with ``device="cuda"``:
   those two modules see a ``torch`` proxy mapping device "cuda" to "cpu".
   p2p_communication.py calls ``torch.cuda.synchronize()`` after batched send/recv: a no-op on
   CPU (there is no asynchronous device queue to wait for).
5. models/common/language_module: with tied embeddings and PP > 1 the last stage's copy of the
   embedding is all-reduced after ``weight.data.cuda()``; on CPU that call keeps the tensor.
6. The optimizer stack (optimizer/optimizer.py, clip_grads.py, distrib_optimizer.py,
   grad_scaler.py) and utils.local_multi_tensor_l2_norm build their flags, norms and loss scales
   with ``device='cuda'``: those modules see the same ``torch`` proxy as in 4.
7. The mixed-precision (Float16OptimizerWithFloat16Params) and distributed optimizers sort
   parameters by ``param.type()`` strings ('torch.cuda.BFloat16Tensor', ...) and refuse anything
   else, and clip_grad_by_total_norm_fp32 asserts ``grad.type() == 'torch.cuda.FloatTensor'``:
   while those run, ``Tensor.type()`` (no argument) of a CPU tensor reports the CUDA name of its
   dtype, so bf16/fp16 CPU parameters get fp32 master copies exactly as GPU ones do.
8. DynamicGradScaler.load_state_dict moves the scale with ``.cuda(device)``: kept on the CPU.
Megatron's DDP grad buffers need nothing more than 2./3. on CPU: their CUDA streams/events are
only created with several distributed-optimizer instances or NCCL user buffers, which this
project does not use. torch 2.13's gloo backend has reduce_scatter_tensor,
all_gather_into_tensor and coalesced collectives (checked), which the DDP buffers and the
distributed optimizer call, so no collective needs emulating.
Not patched, because this project does not use it: sequence parallelism (needs TE/Apex norms).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

_PATCHED = False


def on_gpu() -> bool:
    """True when CUDA devices are usable (then nothing is patched and NCCL is used)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _TorchCudaToCpu:
    """Stands in for ``torch`` inside one megatron module: tensor factories asked for device
    'cuda' get the CPU instead; everything else is the real torch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fix(kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._fix(kwargs))

    def ones(self, *args, **kwargs):
        return torch.ones(*args, **self._fix(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._fix(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._fix(kwargs))


def _patch_rng() -> None:
    """Patch 1: megatron's CUDA RNG tracker keeps CPU generator states instead."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


def _patch_tied_embedding_setup() -> None:
    """Patch 5: ``weight.data.cuda()`` in the tied-embedding PP set-up keeps the CPU tensor."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_gopd_patched", False):
        return

    def setup(self):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = saved

    setup._gopd_patched = True  # type: ignore[attr-defined]  # marks the patch as applied
    LanguageModule.setup_embeddings_and_output_layer = setup


class _CudaTypeNames:
    """While active, ``Tensor.type()`` without arguments names a CPU tensor's type as its CUDA
    twin ('torch.BFloat16Tensor' -> 'torch.cuda.BFloat16Tensor'); ``Tensor.cuda`` keeps CPU
    tensors where they are. Used around the megatron functions of patches 5, 7 and 8."""

    def __enter__(self):
        self.saved = torch.Tensor.type, torch.Tensor.cuda
        original_type = self.saved[0]

        def type_(t, *args, **kwargs):
            name = original_type(t, *args, **kwargs)
            if args or kwargs or not isinstance(name, str) or t.is_cuda:
                return name
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = type_
        torch.Tensor.cuda = lambda t, *a, **k: t
        return self

    def __exit__(self, *exc):
        torch.Tensor.type, torch.Tensor.cuda = self.saved
        return False


def _as_on_cuda(fn):
    """``fn`` run inside :class:`_CudaTypeNames`."""
    if getattr(fn, "_gopd_patched", False):
        return fn

    def wrapped(*args, **kwargs):
        with _CudaTypeNames():
            return fn(*args, **kwargs)

    wrapped._gopd_patched = True
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def _patch_optimizers() -> None:
    """Patches 6-8: megatron's DDP / mixed-precision / distributed optimizer stack on CPU."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as moptimizer

    for module in (moptimizer, clip_grads, distrib_optimizer, grad_scaler, mutils):
        module.torch = _TorchCudaToCpu()  # patch 6
    moptimizer.Float16OptimizerWithFloat16Params.__init__ = _as_on_cuda(
        moptimizer.Float16OptimizerWithFloat16Params.__init__
    )  # patch 7
    distrib_optimizer.DistributedOptimizer.__init__ = _as_on_cuda(distrib_optimizer.DistributedOptimizer.__init__)
    clip = _as_on_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = moptimizer.clip_grad_by_total_norm_fp32 = clip
    grad_scaler.DynamicGradScaler.load_state_dict = _as_on_cuda(
        grad_scaler.DynamicGradScaler.load_state_dict
    )  # patch 8


def setup_platform() -> None:
    """Make megatron-core usable on this machine. Idempotent; a no-op when CUDA is available."""
    global _PATCHED
    if _PATCHED or on_gpu():
        return
    # Patches 2/3 and the p2p synchronize of 4: without CUDA these functions can only raise.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment, return-value]  # megatron only passes it on
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _patch_rng()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    schedules.torch = _TorchCudaToCpu()  # patch 4
    transformer_utils.torch = _TorchCudaToCpu()
    _patch_tied_embedding_setup()
    _patch_optimizers()
    _PATCHED = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TIMEOUT = {"s": 1800.0}


def collective_timeout() -> timedelta:
    """The timeout the world was initialised with (every process group gets it, see parallel.py)."""
    return timedelta(seconds=_TIMEOUT["s"])


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed once and return (rank, world_size).

    Under torchrun the env vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) define
    the world; a plain ``python`` run gets a single-process world. The backend is NCCL on GPUs
    and gloo on CPUs. ``timeout_s`` (train.dist_timeout_s; the first call sets it) bounds every
    collective: a rank that waits longer for a dead or stopped peer fails instead of hanging.
    Also applies :func:`setup_platform`.
    """
    setup_platform()
    if not dist.is_initialized():
        _TIMEOUT["s"] = timeout_s
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
        if on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if on_gpu() else "gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(seconds=timeout_s),
        )
    return dist.get_rank(), dist.get_world_size()
