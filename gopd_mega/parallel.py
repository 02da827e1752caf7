"""Process groups per model: each model (student, teachers, reference) has its own TP/PP layout.

Every model is laid over the WHOLE world: dp = world / (tp * pp). Ranks are ordered like
megatron's default "tp-dp-pp" order (tp fastest, pp slowest):

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so a student at TP=1 and a teacher at TP=2 in a 2-process world see the same two processes as
DP=2 and TP=2 respectively. ``torch.distributed.new_group`` is collective over the whole world
and must be called in the same order on every rank: :func:`build_layout_groups` creates the
groups of a list of layouts in that list's order, once per distinct layout (cached).

What megatron-core 0.16.1 reads from a ``ProcessGroupCollection`` (GPTModel, TransformerBlock,
attention, embeddings, the pipeline schedules): tp, pp, cp, dp_cp, embd, pos_embd. We also fill
dp, mp, tp_cp and tp_dp_cp. 0.19 reads the same names.
What still reads the GLOBAL parallel_state with explicit groups: only
``parallel_state.get_global_memory_buffer()`` (the attention score buffer of the local spec)
and the RNG tracker (``get_cuda_rng_tracker``, used as a context manager by attention dropout
even at p=0; its content does not matter with dropout 0). Both are layout-free; we create them
once here, without ``initialize_model_parallel``, so no global layout is ever chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import random as mrandom

from gopd_mega.platform import collective_timeout, init_distributed


@dataclass
class ModelGroups:
    """Process groups and coordinates of one model layout on this rank."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    pg: ProcessGroupCollection
    """What megatron's GPTModel and schedules take as ``pg_collection``."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def last_stage_global_rank(self) -> int:
        """Global rank of this rank's peer (same tp/dp coordinates) on the last PP stage."""
        return self.tp_rank + self.tp * (self.dp_rank + self.dp * (self.pp - 1))


_CACHE: dict[tuple[int, int], ModelGroups] = {}


def _rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def _ensure_megatron_globals() -> None:
    """The two layout-free globals megatron still reads (see the module docstring)."""
    if getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None) is None:
        parallel_state._set_global_memory_buffer()
    tracker = mrandom.get_cuda_rng_tracker()
    if not tracker.is_initialized():
        mrandom.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)


def _new_groups(rank_lists: list[list[int]], me: int):
    """Create one group per list (collectively, in order) and return the one holding ``me``
    (None when no list holds it, e.g. the embedding group of a middle pipeline stage)."""
    mine = None
    for ranks in rank_lists:
        # new_group's own default is torch's 30 min, not the world's timeout (train.dist_timeout_s)
        group = dist.new_group(ranks, timeout=collective_timeout())
        if me in ranks:
            mine = group
    return mine


def build_model_groups(tp: int, pp: int, name: str = "model") -> ModelGroups:
    """Groups of a model with tensor-parallel size ``tp`` and pipeline size ``pp`` over the world.

    Collective: every rank must call it with the same arguments in the same order (or use
    :func:`build_layout_groups`). Identical layouts are built once and shared.
    """
    init_distributed()
    world, me = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"{name}: tp={tp} x pp={pp} = {tp * pp} does not divide the world size {world}")
    if (tp, pp) in _CACHE:
        return _CACHE[(tp, pp)]
    _ensure_megatron_globals()
    dp = world // (tp * pp)
    coords = [(r % tp, (r // tp) % dp, r // (tp * dp)) for r in range(world)]  # (tp, dp, pp)
    tp_rank, dp_rank, pp_rank = coords[me]
    R = lambda t, d, p: _rank(t, d, p, tp, dp)  # noqa: E731

    tp_lists = [[R(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_lists = [[R(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_lists = [[R(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_lists = [[R(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)]
    # Tied embeddings: the first and last stage hold copies of the word embedding.
    embd_lists = [sorted({ranks[0], ranks[-1]}) for ranks in pp_lists]
    pos_lists = [[ranks[0]] for ranks in pp_lists]
    cp_lists = [[r] for r in range(world)]  # no context parallelism

    pg = ProcessGroupCollection()
    pg.tp = _new_groups(tp_lists, me)
    pg.pp = _new_groups(pp_lists, me)
    pg.dp = _new_groups(dp_lists, me)
    pg.dp_cp = pg.dp
    pg.mp = _new_groups(mp_lists, me)
    pg.cp = _new_groups(cp_lists, me)
    pg.tp_cp = pg.tp
    pg.tp_dp_cp = (
        dist.group.WORLD
        if pp == 1
        else _new_groups([[R(t, d, p) for d in range(dp) for t in range(tp)] for p in range(pp)], me)
    )
    # Ranks outside a stage that needs them get None, as megatron's own parallel_state does.
    pg.embd = _new_groups(embd_lists, me)
    pg.pos_embd = _new_groups(pos_lists, me)
    groups = ModelGroups(tp, pp, dp, tp_rank, pp_rank, dp_rank, pg)
    _CACHE[(tp, pp)] = groups
    return groups


def build_layout_groups(layouts: list[tuple[int, int]], names: list[str] | None = None) -> list[ModelGroups]:
    """Groups for several models, e.g. ``[(student.tp, student.pp), (teacher.tp, teacher.pp)]``.

    Deterministic on every rank: layouts are built in list order, a repeated layout reuses the
    first one's groups. Returns one ModelGroups per entry.
    """
    names = names or [f"model[{i}]" for i in range(len(layouts))]
    return [build_model_groups(tp, pp, name) for (tp, pp), name in zip(layouts, names)]
