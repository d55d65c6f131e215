"""Context parallelism: one long sequence split into contiguous shards, one per rank.

A state update is affine in the state, ``S_out = M(S_in) + F``: a shard is summarised by
``F`` (its final state from a zero initial state: one call of the generated kernels) and
the product ``M`` of its transitions. For identity, scalar and diagonal decays ``M`` is
a scalar or a vector over the decayed dim, ``exp(sum of the shard's log decays)``, derived
from the spec by the compiler (the chunked form's log decay). Every rank all-gathers the
summaries (``F``: one state per sequence and head, ``B * H * |S|`` numbers per rank), runs
the exclusive scan ``S_in(r) = M(r-1) S_in(r-1) + F(r-1)`` locally (an all-gather and a
local prefix beat a ring pass at the world sizes of one node: one collective instead of
``world - 1`` dependent steps), then runs its shard again from its true initial state.
Autograd flows through the kernels, the scan and the differentiable all-gather, so
gradients of every input, param and the initial state equal the single-process ones.

Delta rules and diagonal-plus-low-rank transitions (RWKV-7) have a K x K matrix ``M`` per
sequence and head (``B * H * K * K`` numbers per rank to gather: 4 MiB in fp32 for B = 1,
H = 16, K = 128), measured from runs of the shard from identity columns (the transition
acts on the state's rows, the same for every column). Shards must be in rank order and may have different lengths; params
are whole on every rank. Packed sequences: pass the ``cu_seqlens`` of the whole
concatenation (the same on every rank) with batch-1 shards; a sequence may start, end or
pass through any shard, and ``initial_state`` / the final states are per sequence.
"""

from __future__ import annotations

import torch

from .codegen.chunk_op import ChunkUnsupported, _lambdified, _Tokens, chunk_plan
from .ir.transition import TransitionClass

__all__ = ["shard_summary", "scan_initial_states", "context_parallel", "run_sharded"]

_SUPPORTED = (TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL,
              TransitionClass.DELTA, TransitionClass.DPLR)
#: classes summarised by a K x K matrix acting on the state's rows
_MATRIX = (TransitionClass.DELTA, TransitionClass.DPLR)


def _check(attn, initial_state, cu_seqlens) -> None:
    p = attn.program
    cls = attn.analysis.transition_class
    if p.noncausal:
        raise ValueError(f"spec '{attn.name}' is noncausal: context parallelism splits a "
                         "causal recurrence")
    if cls not in _SUPPORTED:
        raise NotImplementedError(
            f"context parallelism for {cls.value} transitions (spec '{attn.name}') is not "
            "generated yet; identity, scalar and diagonal decays, delta rules and "
            "diagonal-plus-low-rank transitions are")
    from .nn import reads_position
    if reads_position(p):
        raise NotImplementedError(f"spec '{attn.name}' reads the position t, which would "
                                  "restart at 0 in every shard")
    if cls in _MATRIX:
        return          # summarised by runs of the kernels, whatever the chunked form covers
    try:
        chunk_plan(attn.analysis)
    except ChunkUnsupported as e:
        raise NotImplementedError(f"context parallelism: {e}") from None


def shard_summary(attn, local: dict, params: dict, *, form: str, cu_seqlens=None,
                  segments: list[tuple[int, int]] | None = None):
    """A shard's summary: ``F`` (its final states from zero) and per state ``log M``
    (``[B, H]`` for a scalar decay, ``[B, H, n]`` for a diagonal one over the state's dim
    ``n``, None without decay) or, for delta rules, the matrix ``M`` itself (``[B, H, K, K]``,
    acting on the state's rows). With packed sequences (``cu_seqlens``) one row per packed
    sequence, ``segments`` giving their (first token, end). Differentiable."""
    _, F = attn(**local, **params, output_final_state=True, form=form, cu_seqlens=cu_seqlens)
    if attn.analysis.transition_class in _MATRIX:
        return F, _matrix_summary(attn, local, params, F, form, cu_seqlens)
    bound = attn.bind({**local, **params}, None, cu_seqlens)
    ev = _Tokens(bound.inputs, bound.params, bound.sizes, cu_seqlens)
    B, T, H = next(iter(local.values())).shape[:3]

    log_m = {}
    for sp in chunk_plan(attn.analysis).states:
        lm = None
        if sp.log_decay is not None:
            dims = (sp.row,) if sp.decay == 2 else ()
            shape = (B, T, H, *((bound.sizes[sp.row],) if sp.decay == 2 else ()))
            lm = _lambdified(sp.log_decay, sp.log_symbols, ev, dims, shape)
            lm = (lm.sum(1) if segments is None else
                  torch.cat([lm[:, a:b].sum(1) for a, b in segments], 0))
        for s in (sp.state, *sp.columns):
            log_m[s] = lm
    return F, log_m


def _matrix_summary(attn, local: dict, params: dict, F: dict, form: str,
                    cu_seqlens=None) -> dict:
    """Delta rules and DPLR: the product M of the shard's transitions (I - beta k k^T times
    the decay; diag(exp(w)) + b a^T for RWKV-7) as a K x K matrix per sequence and head, from runs of the shard whose initial
    states are columns of the identity: M E = run(E) - run(0). One extra run per V columns
    of K (one when V >= K); B * H * K * K numbers per rank to gather."""
    M = {}
    for s, F_s in F.items():
        N, H, K, V = F_s.shape
        cols = []
        for j0 in range(0, K, V):
            width = min(V, K - j0)
            E = torch.zeros(N, H, K, V, dtype=F_s.dtype, device=F_s.device)
            idx = torch.arange(width, device=F_s.device)
            E[:, :, j0 + idx, idx] = 1.0
            _, out = attn(**local, **params, initial_state={s: E}, output_final_state=True,
                          form=form, cu_seqlens=cu_seqlens)
            cols.append((out[s] - F_s)[..., :width])
        M[s] = torch.cat(cols, -1)
    return M


def _decay(attn, s: str, lm: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """``M(state)`` for state ``s``: its decay broadcast over its dims, or the delta rule's
    matrix applied to its rows."""
    if lm is None:
        return state
    if attn.analysis.transition_class in _MATRIX:
        return lm @ state
    dims = attn.program.states[s].dims
    if lm.dim() == 2:                                  # scalar: [B, H]
        factor = lm.reshape(*lm.shape, *([1] * len(dims)))
    else:                                              # diagonal over the row dim
        row = next(sp.row for sp in chunk_plan(attn.analysis).states
                   if s == sp.state or s in sp.columns)
        axis = dims.index(row)
        factor = lm.reshape(*lm.shape[:2], *[lm.shape[2] if i == axis else 1
                                             for i in range(len(dims))])
    return torch.exp(factor) * state


def scan_initial_states(attn, finals: list[dict], log_ms: list[dict],
                        initial_state: dict | None):
    """Exclusive scan over shards in order: the true initial states of every shard and the
    final states of the whole sequence."""
    names = list(attn.program.states)
    current = {s: (initial_state[s].float() if initial_state is not None
                   else torch.zeros_like(finals[0][s])) for s in names}
    starts = []
    for F, lm in zip(finals, log_ms):
        starts.append(current)
        current = {s: _decay(attn, s, lm[s], current[s]) + F[s] for s in names}
    return starts, current


def run_sharded(attn, shards: list[dict], params: dict, *, form: str = "chunk",
                initial_state: dict | None = None, output_final_state: bool = False):
    """The context-parallel algorithm in one process, shard after shard (the summaries and
    the scan are the code ``context_parallel`` runs across ranks): ``(o of each shard,
    final states or None)``."""
    _check(attn, initial_state, None)
    summaries = [shard_summary(attn, x, params, form=form) for x in shards]
    starts, final = scan_initial_states(attn, [f for f, _ in summaries],
                                        [m for _, m in summaries], initial_state)
    outs = [attn(**x, **params, initial_state=s0, form=form)[0]
            for x, s0 in zip(shards, starts)]
    return outs, (final if output_final_state else None)


def context_parallel(attn, local: dict, params: dict, *, group, form: str = "chunk",
                     initial_state: dict | None = None, output_final_state: bool = False,
                     cu_seqlens=None):
    """This rank's shard of a sequence split over the ranks of ``group`` (rank order =
    sequence order): ``(o of the local shard, final states of the whole sequence on every
    rank, or None)``."""
    import warnings

    import torch.distributed as dist
    with warnings.catch_warnings():     # its replacement has no autograd on gloo yet
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_gather

    _check(attn, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _packed(attn, local, params, group, form, initial_state, output_final_state,
                       cu_seqlens, all_gather)
    F, lm = shard_summary(attn, local, params, form=form)
    names = list(attn.program.states)
    gathered_F = {s: all_gather(F[s].contiguous(), group=group) for s in names}
    gathered_m = {s: (all_gather(lm[s].contiguous(), group=group) if lm[s] is not None
                      else None) for s in names}
    world = dist.get_world_size(group)
    finals = [{s: gathered_F[s][r] for s in names} for r in range(world)]
    log_ms = [{s: (gathered_m[s][r] if gathered_m[s] is not None else None) for s in names}
              for r in range(world)]
    starts, final = scan_initial_states(attn, finals, log_ms, initial_state)
    rank = dist.get_rank(group)
    o, _ = attn(**local, **params, initial_state=starts[rank], form=form)
    if rank == 0:
        # rank 0's start is the given initial state, which reads no gathered summary: a
        # zero-weight term ties its output to them, so its backward runs the all-gathers'
        # backward collectives too (every rank must, or the others wait for it forever)
        tie = sum(x.sum() for parts in [*gathered_F.values(), *filter(
            lambda m: m is not None, gathered_m.values())] for x in parts)
        o = o + (tie * 0).to(o.dtype)
    return o, (final if output_final_state else None)


def _segments(cu: list[int], offset: int, length: int) -> list[tuple]:
    """The packed sequences meeting tokens [offset, offset + length): (sequence, first local
    token, local end, starts on an earlier rank, continues on a later one)."""
    out = []
    for q, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        a, b = max(lo, offset), min(hi, offset + length)
        if a < b:
            out.append((q, a - offset, b - offset, lo < offset, hi > offset + length))
    return out


def _packed(attn, local: dict, params: dict, group, form: str, initial_state,
            output_final_state: bool, cu_seqlens, all_gather):
    """Packed sequences (B = 1) split over the ranks. ``cu_seqlens`` holds the boundaries of
    the whole concatenation, the same tensor on every rank; a sequence may start, end or
    pass through any shard. Each rank summarises every piece of a sequence in its shard;
    one all-gather of those summaries (padded to the most pieces on a rank) lets every rank
    run each sequence's scan: the initial state of its own first piece and every final
    state. Every rank's outputs depend on that one gather, so its backward runs on all
    ranks whatever the loss reads."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x0 = next(iter(local.values()))
    if x0.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the inputs are packed: batch 1, got {x0.shape[0]}")
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x0.shape[1]]), group=group)
    lengths = [int(n) for n in lengths]
    cu = [int(n) for n in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != sum(lengths):
        raise ValueError(f"cu_seqlens must run from 0 to the total length of the shards "
                         f"({sum(lengths)} tokens), got {cu[0]} .. {cu[-1]}")
    offsets = [sum(lengths[:r]) for r in range(world)]
    pieces = [_segments(cu, offsets[r], lengths[r]) for r in range(world)]
    segs = pieces[rank]
    local_cu = torch.tensor([0] + [b for _, _, b, _, _ in segs], device=x0.device)
    names = list(attn.program.states)
    F, M = shard_summary(attn, local, params, form=form, cu_seqlens=local_cu,
                         segments=[(a, b) for _, a, b, _, _ in segs])
    most = max(len(p) for p in pieces)
    F_all = {s: all_gather(_pad(F[s], most), group=group) for s in names}
    M_all = {s: (all_gather(_pad(M[s], most), group=group) if M[s] is not None else None)
             for s in names}

    def first_state(q: int) -> dict:
        if initial_state is not None:
            return {s: initial_state[s][q:q + 1].float() for s in names}
        return {s: torch.zeros_like(F[s][:1]) for s in names}

    state = {}                 # per sequence: its state after the pieces scanned so far
    starts = []
    for r in range(world):
        for i, (q, _, _, _, _) in enumerate(pieces[r]):
            current = state.get(q) or first_state(q)
            if r == rank:
                starts.append(current)
            state[q] = {s: _decay(attn, s, M_all[s][r][i:i + 1] if M_all[s] is not None
                                  else None, current[s]) + F_all[s][r][i:i + 1]
                        for s in names}
    initial = {s: torch.cat([d[s] for d in starts], 0) for s in names}
    o, _ = attn(**local, **params, initial_state=initial, form=form, cu_seqlens=local_cu)
    if not output_final_state:
        return o, None
    finals = [state.get(q) or first_state(q) for q in range(len(cu) - 1)]  # empty ones too
    return o, {s: torch.cat([f[s] for f in finals], 0) for s in names}


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows added up to ``rows`` (equal shapes for the all-gather)."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])], 0).contiguous()
