r"""DFMU for causal LMs under ``torchrun``: the fine-tune on FSDP2 (``fully_shard``), DDP where FSDP2 fails.

Every rank calls :func:`dfmu_ext.unlearn` with the same model, data and seed. What each stage does:

* **Scoring.** Rank ``r`` scores samples ``r, r + W, ...`` of the scoring batch; the neurons' scores,
  the group counts and the loss are summed over ranks (:func:`dfmu_ext.lm.neurons.score_neurons`,
  ``comm=``), and rank 0's masks are broadcast, so they are bit-identical on every rank.
* **Forget targets and the retain-projected edit** run on every rank, on the same data with the same
  seed, before anything is sharded: they are the one-process computation, repeated (cheaper than
  sending a positions x k target table, and nothing waits on rank 0). The edited weights are then
  broadcast from rank 0 (:func:`broadcast_parameters`) so that a kernel's run-to-run rounding could
  never leave the replicas apart.
* **The fine-tune** trains a copy of the model with its transformer blocks and its root wrapped by
  ``fully_shard`` (:func:`fully_sharded_copy`): each rank holds ``1/W`` of every trained parameter, of
  its gradient and of both Adam moments. The global batch of ``batch_size`` sequences is drawn from the
  same seeded order on every rank, and rank ``r`` takes its rows ``r, r + W, ...``. Each loss term is
  a mean over a count (scored tokens, forget positions, real positions): a rank's term is rescaled to
  :math:`W \cdot \sum_{\mathrm{local}} / \mathrm{count}_{\mathrm{global}}`, so that FSDP's gradient
  average over ranks is exactly the one-process gradient of the global batch. A rank whose share of a
  batch is empty runs one row at weight 0 (every rank must join the collectives).
* **The masks** are re-applied after every step on each rank's local shard of the weights and of both
  Adam moments (:class:`ShardedMaskPlan`): FSDP2 shards dim 0 in ``ceil(n / W)`` chunks, so the local
  shard is rows ``[r c, r c + c)`` and only the mask's slice for those rows is needed when the neurons
  index dim 0 (GPT-2's ``Conv1D``); no communication. (Masking through ``full_tensor`` would all-gather
  and scatter every masked weight each step for the same result.)
* **The model between runs** is the full, unsharded one: when a fine-tune run starts, each rank copies
  its rows of the model into the shards (local slicing); when it ends, the trained parameters are
  all-gathered back (``full_tensor``). The retention guard and the forget side measure the full model
  on the full validation set on every rank: the weights are bit-identical after the all-gather and the
  forward is the same computation, so every rank takes the same decision without a collective.
* **One backward per term**, as in one process (:meth:`LMObjective.loss`): the batch's, the forget
  term's, the neighbours', in the same order on every rank; each accumulates into the sharded
  (FSDP2) ``.grad``, so the step's peak is its largest term's graph. Under DDP only the step's last
  backward through DDP all-reduces (the others' forwards run under ``no_sync``): one all-reduce of
  the trained gradients per step, not one per term.
* **DDP fallback.** Where ``fully_shard`` fails (an old PyTorch, a backend without reduce-scatter) or
  ``DFMU_LM_PARALLEL=ddp`` is set, the model itself is wrapped in ``DistributedDataParallel`` with the
  same rows and rescaled losses. ``info["parallel"]`` says which ran and, on a fallback, why.

* **The distillation teacher** (FSDP2) is sharded in place before the model's copy is made
  (:func:`shard_teacher`: per block, the untied embedding and head, then the root; frozen, resharded
  after every forward): each rank keeps ``1/W`` of it, and its forward is a collective. Every rank
  calls it equally often in a step — once on its rows of the batch (:meth:`ParallelLMObjective.loss`)
  and once on its rows of the neighbours (their term, run after the batch's backward), a rank with
  none of either running one row at weight 0. The
  caller's reference is the same module, so no whole teacher remains. Under DDP it stays whole.

Per-rank memory (FSDP2): the full model, ``1/W`` of the teacher, and ``1/W`` of the trained
parameters with their gradients and moments (the copy is never whole: :func:`fully_sharded_copy`) —
the optimizer state, the largest part of a fine-tune, is sharded; the full replicas are what the
guard and the result need. On a 58.5M-parameter Llama with 2 Gloo ranks
(``benchmarks/lm_fsdp_memory.py``; benchmarks/RESULTS.md, "FSDP2: the teacher sharded"): the
teacher's 223 MiB become 111.5 per rank, and the resident set between steps, the peak while the
objective is built and the peak of the steps each fall by 111 MiB (steps ~25% slower on the CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from torch import nn

from .._common import seeded, train_mode
from ..distributed import Comm
from ..finetune import AdamW, distill_loss
from ..lm.neurons import NeuronLayer, neuron_mask_plan
from ..lm.task import forward_logits, input_embedding, lm_loss, scored_tokens
from ..model_io import copy_model
from ..pruning import MaskPlan
from .lm_finetune import LMObjective, _training_only

PARALLEL_ENV = "DFMU_LM_PARALLEL"


def parallel_mode() -> str:
    """``$DFMU_LM_PARALLEL``: ``"fsdp"`` (the default: FSDP2, DDP if it fails) or ``"ddp"``."""
    mode = os.environ.get(PARALLEL_ENV, "").strip().lower() or "fsdp"
    if mode not in ("fsdp", "ddp"):
        raise ValueError(f"{PARALLEL_ENV} must be 'fsdp' or 'ddp', got {mode!r}")
    return mode


def transformer_blocks(model: nn.Module, layers: list[NeuronLayer]) -> list[nn.Module]:
    """The units FSDP2 shards one at a time: the modules named by a Hugging Face model's
    ``_no_split_modules`` (its decoder layers), else the entries of any ``nn.ModuleList`` that hold an
    MLP's down projection; empty for a model with neither (then the root alone is one unit)."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    if kinds:
        return [m for m in model.modules() if type(m).__name__ in kinds]
    downs = [model.get_submodule(l.name) for l in layers]
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m
            if any(d is s for s in child.modules() for d in downs)]


def fully_sharded_copy(model: nn.Module, trained: list[str], layers: list[NeuronLayer]):
    """A copy of ``model`` with only the parameters named in ``trained`` requiring a gradient, each
    transformer block and then the root wrapped by ``fully_shard``; returns it and its sharded
    parameters by name (DTensors, ``Shard(0)``). Raises whatever FSDP2 raises where it cannot run.
    Made empty (meta device), sharded, then allocated (``to_empty``) and filled with this rank's rows
    and the model's buffers: a whole copy sharded after the fact was a second whole model meanwhile."""
    from torch.distributed.fsdp import fully_shard

    net = copy_model(model, empty=True)
    keep = set(trained)
    for name, p in net.named_parameters():
        p.requires_grad_(name in keep)
    for block in transformer_blocks(net, layers):
        fully_shard(block)
    fully_shard(net)
    net.to_empty(device=next(model.parameters()).device)
    params = dict(net.named_parameters())
    for name, p in params.items():
        if not hasattr(p, "to_local") or len(p.placements) != 1 or getattr(p.placements[0], "dim", None) != 0:
            raise RuntimeError(f"fully_shard left {name} as {type(p).__name__} {getattr(p, 'placements', '')}: "
                               "expected a DTensor sharded on dim 0")
    full, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for name, p in params.items():
            p.to_local().copy_(full[name].detach()[shard_rows(p)])
        for name, b in net.named_buffers():
            b.copy_(buffers[name])
    return net, params


def vocabulary_matrices(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The token embedding and the output head (``get_output_embeddings()``, Hugging Face), each
    where its weights are its own — not tied to the other or to any module outside it, and not
    inside one of ``blocks`` (FSDP2 units must nest, and a shared weight belongs to one unit). At a
    large vocabulary each is as large as a few transformer blocks and used at one end of a forward,
    so a forward-only model gathers them one at a time rather than together with the root's."""
    getter = getattr(model, "get_output_embeddings", None)
    candidates = [input_embedding(model), getter() if callable(getter) else None]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    out = []
    for unit in candidates:
        if not isinstance(unit, nn.Module) or id(unit) in in_blocks or any(unit is m for m in out):
            continue
        inside, mine = {id(m) for m in unit.modules()}, {id(p) for p in unit.parameters()}
        shared = any(id(p) in mine for m in model.modules() if id(m) not in inside
                     for p in m.parameters(recurse=False))
        if mine and not shared:
            out.append(unit)
    return out


def shard_teacher(teacher: nn.Module, layers: list[NeuronLayer]) -> nn.Module:
    """The distillation ``teacher`` sharded in place for forward only: its parameters frozen, each
    transformer block and then the root wrapped by ``fully_shard`` with ``reshard_after_forward=True``
    (the root too: FSDP2 would otherwise keep a root's parameters gathered after its forward, for a
    backward that a teacher never runs), and the token embedding and the head, when not tied, as units
    of their own (:func:`vocabulary_matrices`). Each rank then holds ``1/W`` of every weight; a forward
    gathers one unit's weights at a time, and the root's small rest (the final norm) for its length,
    so it is a collective that every rank must call as often. In place, because a copy
    would briefly hold a second full teacher: the caller's reference becomes the sharded module and
    ``fully_shard`` frees each full weight as it replaces it. Returns ``teacher``."""
    from torch.distributed.fsdp import fully_shard

    for p in teacher.parameters():
        p.requires_grad_(False)
    blocks = transformer_blocks(teacher, layers)
    for unit in blocks + vocabulary_matrices(teacher, blocks):
        fully_shard(unit, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    for name, p in teacher.named_parameters():
        if not hasattr(p, "to_local"):
            raise RuntimeError(f"fully_shard left the teacher's {name} as {type(p).__name__}: expected a DTensor")
    return teacher


def shard_rows(p) -> slice:
    """The rows of dim 0 that this rank's shard of the DTensor ``p`` holds (FSDP2: ``ceil(n / W)``-row chunks)."""
    n, world = int(p.shape[0]), p.device_mesh.size()
    chunk = -(-n // world)
    start = min(p.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    local = p.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(f"a shard of {local.shape[0]} rows where rows {start}:{stop} of {n} were expected")
    return slice(start, stop)


class ShardedMaskPlan(MaskPlan):
    """A :class:`dfmu_ext.pruning.MaskPlan` over FSDP2-sharded weights: the masks go to each rank's
    local shard of the weight and of every optimizer state tensor of its shape (the Adam moments),
    the mask sliced to the shard's rows when the units index dim 0."""

    def tensors_and_masks(self, optimizer=None):
        tensors, masks = [], []
        for p, m, dim in zip(self.params, self.masks, self.dims):
            rows = shard_rows(p)
            mask = m[rows] if dim == 0 else m
            states = [v for v in (optimizer.state.get(p, {}).values() if optimizer is not None else ())
                      if hasattr(v, "to_local") and v.shape == p.shape and v.is_floating_point()]
            for t in [p] + states:
                local = t.to_local()
                tensors.append(local if dim == 0 else local.transpose(0, dim))
                masks.append(mask.to(local.device))
        return tensors, masks


def broadcast_parameters(model: nn.Module, comm: Comm) -> None:
    """Every parameter and floating buffer of ``model`` overwritten with rank 0's (native dtype)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            if dist.get_backend() == "nccl" or t.device.type == "cpu":
                dist.broadcast(t.data, src=0)
            else:  # gloo moves CPU tensors only
                cpu = t.detach().cpu()
                dist.broadcast(cpu, src=0)
                t.copy_(cpu)


class ParallelLMObjective(LMObjective):
    """:class:`dfmu_ext.tasks.lm_finetune.LMObjective` across ranks: the same loss of the same global
    batches, each rank computing its rows' share, on an FSDP2-sharded copy (DDP on a fallback)."""

    def __init__(self, model: nn.Module, budget, config, *, device, seed: int, comm: Comm, masks: dict,
                 forget=None, forget_term=None, layers=(), teacher=None, neighbours=None):
        super().__init__(model, budget, config, device=device, seed=seed, forget=forget, forget_term=forget_term,
                         layers=layers, teacher=teacher, neighbours=neighbours)
        self.comm, self.full, self.ddp = comm, model, None
        broadcast_parameters(model, comm)
        self.mode, self.reason = parallel_mode(), None
        names = {id(p): n for n, p in model.named_parameters()}
        self.trained = [names[id(p)] for p in self.params]
        self.rows_name = names[id(self.rows[0])] if self.rows is not None else None  # "mlp+entity"'s embedding
        distilled = self.teacher is not None and config.distill > 0
        if self.mode == "fsdp":
            try:
                if distilled:  # first: the model's copy below is then made beside 1/W of a teacher, not all of it
                    shard_teacher(self.teacher, list(layers))
                self.net, self.shards = fully_sharded_copy(model, self.trained, list(layers))
            except Exception as exc:  # noqa: BLE001 - any failure of FSDP2 here means: use DDP, and say why
                self.mode, self.reason = "ddp", f"fully_shard failed ({type(exc).__name__}: {exc})"
            # one rank's failure sends every rank to DDP (else they would hang); DDP needs the whole
            # teacher, gone once fully_shard has replaced any of its weights
            flags = torch.tensor([float(self.mode != "fsdp"),
                                  float(distilled and any(hasattr(p, "to_local") for p in self.teacher.parameters()))])
            comm.all_reduce_sum_([flags])
            if flags[0].item() > 0 and flags[1].item() > 0:
                why = self.reason or "fully_shard failed on another rank"
                raise RuntimeError(f"FSDP2 failed after sharding the distillation teacher ({why}): "
                                   f"run with {PARALLEL_ENV}=ddp")
            if flags[0].item() > 0 and self.mode == "fsdp":
                self.mode, self.reason = "ddp", "fully_shard failed on another rank"
        if self.mode == "fsdp":
            self.model = self.net
            self.params = [self.shards[n] for n in self.trained]
            self.optimizer = AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
            net_layers = [dataclasses.replace(l, layer=self.net.get_submodule(l.name)) for l in layers]
            plan = neuron_mask_plan(net_layers, masks)
            self.local_plan = ShardedMaskPlan(plan.params, plan.masks, plan.dims)

    @classmethod
    def build(cls, model, split, targets, pruned, configs, device, seed, comm, teacher) -> "ParallelLMObjective":
        """The objective for :meth:`CausalLMTask.objective` under a process group; which parallelism
        ran goes into the split's description (``info["parallel"]`` and the deletion record)."""
        objective = cls(model, split.budget, configs["finetune"], device=device, seed=seed, comm=comm,
                        masks=pruned.masks, forget=targets.payload, forget_term=configs["forget_term"],
                        layers=split.extra["layers"], teacher=teacher, neighbours=targets.info.get("_neighbours"))
        split.describe["parallel"] = objective.describe()
        return objective

    def describe(self) -> dict:
        out = {"mode": "fsdp2" if self.mode == "fsdp" else "ddp", "world_size": self.comm.world_size}
        return {**out, "fallback": self.reason} if self.reason else out

    # ---- the runs: the full model in, the trained shards back out ----

    def context(self):
        stack = contextlib.ExitStack()
        # each rank its own stream: dropout draws independent masks for the rows each rank holds (the
        # batches' order has its own generator, identical on every rank)
        stack.enter_context(seeded(self.seed + 7919 * self.comm.rank, self.device))
        if self.mode == "fsdp":
            stack.enter_context(self._sharded())
            stack.enter_context(train_mode(self.net))
        else:
            stack.enter_context(train_mode(self.full))
            stack.enter_context(_training_only(self.full, self.params))
            if self.ddp is None:  # built once, with the trained parameters the only ones requiring a gradient
                self.ddp = self.comm.wrap(self.full)
            self.model = self.ddp
        return stack

    @contextlib.contextmanager
    def _sharded(self):
        full = dict(self.full.named_parameters())
        with torch.no_grad():
            for name, p in self.shards.items():
                p.to_local().copy_(full[name].detach()[shard_rows(p)])
        yield
        with torch.no_grad():  # only on success: after a rank's error the others must not wait in a gather
            for name in self.trained:
                full[name].copy_(self.shards[name].full_tensor())

    def backward_step(self, loss: torch.Tensor) -> None:
        """As one process's (the budget term's backward, then each queued term's, then the step), with
        the embedding's rows masked on the reduced gradient and the masks applied to the local shards.
        Under DDP one backward of the step all-reduces, the last one through DDP (:meth:`_reduce_after`):
        the others accumulate this rank's part in ``.grad``, and DDP then averages the whole sum, so the
        step's gradient is the mean over ranks of every term's, as if each backward had been reduced."""
        loss.backward()
        keep = self.shards[self.rows_name] if self.mode == "fsdp" and self.rows is not None else \
            (self.rows[0] if self.rows is not None else None)
        last = max((i for i, (_, routed, *_) in enumerate(self.terms) if not routed), default=None)
        self.terms = [(name, routed, self._reduce_after(fn, i == last), *ids)
                      for i, (name, routed, fn, *ids) in enumerate(self.terms)]
        rest = self.backward_terms(keep)
        with torch.no_grad():
            loss.detach().add_(rest)
        self._entity_rows_only()
        self.optimizer.step()
        if self.mode == "fsdp":  # the caller's plan holds the full model's weights, not these shards
            self.local_plan.apply(self.optimizer)

    def _reduce_after(self, term_fn, reduce: bool):
        """``term_fn``, its forward run so that its backward all-reduces under DDP only when ``reduce``
        (DDP decides at the forward, :meth:`DistributedDataParallel.no_sync`): one all-reduce per step
        instead of one per term. FSDP2 reduce-scatters at every backward either way."""
        if self.mode == "fsdp" or reduce:
            return term_fn

        def unreduced():
            with self.ddp.no_sync():
                return term_fn()
        return unreduced

    def _routed_backward(self, term: torch.Tensor, keep: torch.Tensor | None) -> None:
        if self.mode == "fsdp":
            return super()._routed_backward(term, keep)
        # DDP reduces in its hooks at every backward: the routed term's gradient is taken aside (no
        # hook fires) and averaged here, as DDP averages the rest
        routed = torch.autograd.grad(term, keep)[0]
        self.comm.all_reduce_sum_([routed])
        routed.div_(self.comm.world_size)
        keep.grad = routed if keep.grad is None else keep.grad.add_(routed)

    def _entity_rows_only(self) -> None:
        """``train="mlp+entity"``: the embedding's gradient kept on the forget set's token rows only
        (this rank's shard of them under FSDP2; the reduced gradient under DDP), as the one-process
        hook does."""
        if self.rows is None:
            return
        weight, mask = self.rows
        if self.mode == "fsdp":
            shard = self.shards[self.rows_name]
            if shard.grad is not None:
                shard.grad.to_local().mul_(mask[shard_rows(shard)])
        elif weight.grad is not None:
            weight.grad.mul_(mask)

    # ---- the loss: this rank's rows, each term rescaled to its share of the global mean ----

    def _rows(self, n: int) -> tuple[slice, float]:
        r, w = self.comm.rank, self.comm.world_size
        return (slice(r, None, w), 1.0) if r < n else (slice(0, 1), 0.0)

    def _share(self, local, total, live: float) -> float:
        return live * self.comm.world_size * float(local) / max(float(total), 1.0)

    def _mine(self, rows: list[int], counted: torch.Tensor) -> tuple[list[int], float]:
        """This rank's rows of a term (the forget term's, the neighbours') and its share of the term's
        global mean, as for the budget's rows."""
        mine, live = self._rows(len(rows))
        pick = rows[mine]
        return pick, self._share(counted[pick].sum(), counted[rows].sum(), live)

    def loss(self, batch, forget_phase: bool):
        """This rank's share of the budget term; the other terms queued as in one process (every
        rank queues the same ones in the same order: the sharded teacher's forwards stay collective)."""
        x, y = batch
        rows, live = self._rows(int(x.shape[0]))
        xl, yl = x[rows], y[rows]
        forget = forget_phase and self.forget is not None
        distill = self.teacher is not None and self.config.distill > 0
        # under DDP the budget's backward all-reduces only when no other term's backward through DDP
        # follows in this step (see backward_step)
        follows = (forget and not self.into_rows) or (distill and self.neighbours is not None)
        with (self.ddp.no_sync() if self.mode != "fsdp" and follows else contextlib.nullcontext()):
            logits = forward_logits(self.model, xl)
        loss = lm_loss(logits, yl) * self._share(scored_tokens(yl).sum(), scored_tokens(y).sum(), live)
        self.terms = []
        if forget:
            self.terms.append(("forget", self.into_rows, self._forget_term))
        if distill:
            with torch.no_grad():
                reference = forward_logits(self.teacher, xl)
            real = xl["attention_mask"].bool() if "attention_mask" in xl else None
            counts = (real.sum(), x["attention_mask"].bool().sum()) if real is not None else \
                (yl.numel(), y.numel())
            loss = loss + self.config.distill * self._share(*counts, live) * distill_loss(logits, reference, real)
            if self.neighbours is not None:   # where they differ from the forget sequences (lm.neighbours)
                self._queue_neighbours()
        return loss, None, int(x.shape[0])
