"""DFMU under ``torch.distributed`` (DDP, e.g. ``torchrun``): the one module that imports it.

The pipeline talks to its peers through one object, a :class:`Comm`, passed down from ``unlearn``:
:class:`Comm` itself is the single-process implementation (every collective a no-op, nothing
wrapped or sharded), :class:`ProcessGroupComm` the one for a process group; :func:`current_comm`
picks the right one. No stage branches on "am I distributed?".

What crosses the network, and when:

* **Scoring.** Every rank scores its own shard of the scoring batch (rank ``r`` takes samples
  ``r, r + W, r + 2W, ...``); the per-block ``(groups, units)`` scores and the group counts are
  summed over ranks (:meth:`Comm.all_reduce_sum_`), so selection sees the scores of the whole
  batch. Rank 0's masks are then broadcast, so every rank applies bit-identical masks even if a
  float summation order ever differed. Only these tiny tensors are sent, never activations.
* **Fine-tune.** Each rank trains on its share of the retain budget (``DistributedSampler`` with the
  run's seed, reshuffled per epoch), with a per-rank batch of ``ceil(batch_size / W)`` so that the
  *global* batch, the number of steps and the learning rate mean what they mean in one process.
  ``DistributedDataParallel`` averages the gradients; the masks are re-applied identically on every
  rank after each step. The early-stop window is fed the per-step (correct, seen) counts summed
  over ranks, so every rank takes the same decision at the same step (otherwise ranks would hang).
* **BatchNorm statistics.** DDP runs with ``broadcast_buffers=False``: each rank tracks running
  statistics on its shard, and at the end the floating buffers are averaged over ranks (the average
  of the per-rank moving averages equals a moving average of the averaged batch statistics);
  integer buffers are taken from rank 0. The replicas are then identical.

Failures: the process group is created with a timeout (``DFMU_DIST_TIMEOUT`` seconds, default 60),
so a rank whose peer crashed or hangs raises :class:`DistributedError` instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os

import torch
from torch import nn

__all__ = [
    "Comm", "ProcessGroupComm", "current_comm", "DistributedError", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S",
    "is_distributed", "get_rank", "get_world_size", "is_main_process", "timeout_from_env", "env_world_size",
    "init_from_env", "record", "destroy", "state_digest", "replicas_identical",
]

TIMEOUT_ENV = "DFMU_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, raised, or is stuck past the timeout."""


# --------------------------------------------------------------------------------------------
# where are we
# --------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist
    return dist


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints and writes files."""
    return get_rank() == 0


def env_world_size() -> int:
    """``$WORLD_SIZE`` as set by torchrun (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {value}")
    return value


def timeout_from_env() -> datetime.timedelta:
    """The collective timeout: ``$DFMU_DIST_TIMEOUT`` seconds (a positive number), default 60 s."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: str | torch.device = "auto", backend: str | None = None) -> tuple[torch.device, bool]:
    """Join the process group described by torchrun's environment when ``WORLD_SIZE > 1``.

    ``device`` is "auto", "cpu" or "cuda[:N]"; on CUDA each rank takes ``cuda:$LOCAL_RANK``. The
    backend is NCCL on CUDA and Gloo on the CPU unless ``backend`` names one. Returns
    ``(device, created)``; ``created`` is False (and nothing happens) in a single process or when a
    group already exists — only the creator should :func:`destroy` it.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    world = env_world_size()
    dist = _dist()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return dev, False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    timeout = timeout_from_env()
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    except Exception as exc:
        raise DistributedError(f"rank {os.environ.get('RANK')} of {world} could not join the {backend} process group "
                               f"within {timeout.total_seconds():g} s ({TIMEOUT_ENV}): {exc}") from exc
    return dev, True


def record(fn):
    """``fn`` wrapped so that, under torchrun, a failing rank's traceback is reported by torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import record as elastic_record

    return elastic_record(fn)


def destroy() -> None:
    """Destroy the default process group if one exists."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                       "broken pipe", "process group", "c10d")


def _collective_failure(exc: BaseException) -> bool:
    dist = _dist()
    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    if kinds and isinstance(exc, kinds):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COLLECTIVE_MARKERS)


@contextlib.contextmanager
def _collective_guard(stage: str):
    """Re-raise a failed collective inside ``stage`` as a :class:`DistributedError` naming the rank,
    the stage and the timeout."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as exc:
        if not _collective_failure(exc):
            raise
        raise DistributedError(
            f"rank {get_rank()} of {get_world_size()} failed during {stage}: a collective did not complete "
            f"({exc}). Another rank probably crashed, raised or is stuck; collectives time out after "
            f"{timeout_from_env().total_seconds():g} s (set {TIMEOUT_ENV}). Check the other ranks' logs.") from exc


# --------------------------------------------------------------------------------------------
# the communicator
# --------------------------------------------------------------------------------------------

class Comm:
    """One process: the pipeline's view of its peers when it has none. Every collective is a no-op,
    the scoring batch is not sharded, the fine-tune shuffles its own data and the model is not
    wrapped. :class:`ProcessGroupComm` overrides each method for a process group."""

    world_size = 1
    rank = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that prints and writes files."""
        return self.rank == 0

    def guard(self, stage: str):
        """A context that turns a failed collective inside ``stage`` into a :class:`DistributedError`."""
        return contextlib.nullcontext()

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place (one collective, float64)."""

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (one collective; floats only)."""

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's shard of a batch ``(x, y, ...)`` (tensors sharing dim 0): samples ``rank, rank + W, ...``."""
        return batch

    def global_fraction(self, correct: int, total: int, device: torch.device | None = None) -> float:
        """``sum(correct) / sum(total)`` over ranks, rounded as ``Tensor.float().mean()`` would be."""
        c = torch.tensor([float(correct), float(total)], dtype=torch.float64)
        c = self._summed(c, device)
        n_correct, n_total = int(c[0]), int(c[1])
        if n_total == 0:
            return float("nan")
        return float(torch.tensor(n_correct, dtype=torch.float32) / n_total)

    def _summed(self, t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        return t

    # ---- the fine-tune ----

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's batch, so that the global batch stays ``batch_size``."""
        return batch_size

    def sampler(self, dataset, seed: int):
        """The sampler that gives this rank its share of ``dataset`` (None: shuffle it all)."""
        return None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the fine-tune calls (DistributedDataParallel under a process group)."""
        return model

    def reduce_counts(self, correct: int, seen: int) -> tuple[int, int]:
        """A step's (correct, seen) summed over ranks, so every rank takes the same early-stop decision."""
        return correct, seen

    def sync_buffers_(self, model: nn.Module) -> None:
        """Average floating buffers (BatchNorm running statistics) over ranks; others from rank 0."""


class ProcessGroupComm(Comm):
    """The default process group of ``torch.distributed`` with more than one rank."""

    def __init__(self):
        self.dist = _dist()
        self.world_size = self.dist.get_world_size()
        self.rank = self.dist.get_rank()

    def guard(self, stage: str):
        return _collective_guard(stage)

    def _device_for(self, like: torch.device) -> torch.device:
        """NCCL only moves CUDA tensors; Gloo is fine with CPU ones."""
        if self.dist.get_backend() == "nccl":
            return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _packed(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        dev = self._device_for(tensors[0].device)
        return torch.cat([t.detach().reshape(-1).to(dev, dtype) for t in tensors])

    @staticmethod
    def _unpack_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape))
                offset += n

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = self._packed(tensors, torch.float64)
        self.dist.all_reduce(flat)
        self._unpack_(flat, tensors)

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        if not tensors:
            return
        flat = self._packed(tensors, torch.float64)
        self.dist.broadcast(flat, src=src)
        self._unpack_(flat, tensors)

    def shard(self, batch):
        n = batch[0].shape[0]
        if n < self.world_size:
            raise ValueError(f"the scoring batch has {n} samples, fewer than the {self.world_size} ranks: raise "
                             "score_samples")
        return tuple(t[self.rank::self.world_size] for t in batch)

    def _summed(self, t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        t = t.to(self._device_for(device or torch.device("cpu")))
        self.dist.all_reduce(t)
        return t.cpu()

    def local_batch_size(self, batch_size: int) -> int:
        return max(1, math.ceil(batch_size / self.world_size))

    def sampler(self, dataset, seed: int):
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=False)

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **_no_forward_buffer_sync())

    def reduce_counts(self, correct: int, seen: int) -> tuple[int, int]:
        t = torch.tensor([correct, seen], dtype=torch.int64, device=self._device_for(torch.device("cpu")))
        self.dist.all_reduce(t)
        return int(t[0]), int(t[1])

    @torch.no_grad()
    def sync_buffers_(self, model: nn.Module) -> None:
        floats = [b for b in model.buffers() if b.is_floating_point()]
        others = [b for b in model.buffers() if not b.is_floating_point()]
        if floats:
            flat = self._packed(floats, torch.float64)
            self.dist.all_reduce(flat)
            flat /= self.world_size
            self._unpack_(flat, floats)
        if others:
            flat = torch.cat([b.reshape(-1).to(self._device_for(b.device), torch.int64) for b in others])
            self.dist.broadcast(flat, src=0)
            self._unpack_(flat, others)


def current_comm() -> Comm:
    """A :class:`ProcessGroupComm` when a process group of more than one rank is initialised, else a
    single-process :class:`Comm`."""
    return ProcessGroupComm() if is_distributed() else Comm()


def _no_forward_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast: ``forward_sync_buffers=False`` on
    newer PyTorch (which deprecates ``broadcast_buffers``), ``broadcast_buffers=False`` before.
    The one sync at construction is harmless: every replica starts identical."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def state_digest(model: nn.Module) -> str:
    """SHA-256 of every state_dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replicas_identical(model: nn.Module) -> bool:
    """True when every rank's model has the same :func:`state_digest` (collective; True in one process)."""
    if not is_distributed():
        return True
    digests: list = [None] * get_world_size()
    _dist().all_gather_object(digests, state_digest(model))
    return len(set(digests)) == 1
