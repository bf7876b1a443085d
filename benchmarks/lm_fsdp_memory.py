"""Per-rank memory of DFMU's FSDP2 LM fine-tune with the distillation teacher whole or sharded (issue 28).

    python benchmarks/lm_fsdp_memory.py [--size 60m] [--steps 3] [--world 2]

The driver starts, for each variant, ``--world`` Gloo ranks on the CPU through ``torch.distributed.run``
(fresh processes: a process's peak RSS covers only its own variant). Every rank builds the same
random-init Llama, masks ~10% of every MLP's neurons, copies the teacher, builds
:class:`dfmu_ext.tasks.lm_parallel.ParallelLMObjective` and runs ``--steps`` fine-tune steps (the
budget's next-token loss + distillation to the teacher). Variants:

* ``full``: the teacher kept whole on every rank, as before issue 28's teacher sharding
  (:func:`dfmu_ext.tasks.lm_parallel.shard_teacher` replaced by the identity);
* ``whole-copy``: the teacher sharded, but the model's sharded copy made as before from a whole copy
  of the model (``copy_model`` without ``empty``: a second whole model until ``fully_shard`` has
  replaced its weights);
* ``sharded``: the code as it is (the teacher sharded in place, then the model's copy made empty on
  the meta device, sharded and filled with this rank's rows).

Per rank it reports the resident set (``/proc/self/statm``) after each stage and after every step,
the peak (``getrusage``'s ``ru_maxrss``) once the objective is built and at the end, and the bytes
held, counted from the tensors: the caller's model, the teacher (its local shards where sharded),
the trained copy's shards and the optimizer state. The ranks run with a fixed glibc mmap threshold
(``--glibc-default`` to leave the allocator as it is: see ``MMAP_THRESHOLD``).
Rank 0 of each variant prints a JSON line; the driver prints a table and one JSON line of them all.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

MiB = 2**20
SIZES = {  # hidden, layers, intermediate, heads, vocab, sequence length, sequences
    "small": (64, 2, 160, 4, 256, 32, 16),
    "60m": (512, 8, 1408, 8, 32000, 128, 16),
}
TAG = "LM_FSDP_MEMORY "
# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; buffers under it
# then come from the heap and stay resident after they are freed, so the resident set would measure
# the allocator's history. A fixed threshold returns every tensor above 128 KiB to the system on free.
MMAP_THRESHOLD = "131072"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors``: a DTensor's local shard, a plain tensor whole; each storage once."""
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset())
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def _stage(stages: dict, name: str) -> None:
    """The resident set now and the peak so far (MiB), after a garbage collection."""
    gc.collect()
    stages[name] = [round(_rss_mib(), 1), round(_peak_mib(), 1)]


def worker(size: str, steps: int, variant: str) -> dict:
    import torch
    import transformers

    from dfmu_ext import distributed as dd
    from dfmu_ext.finetune import run_finetune
    from dfmu_ext.lm.neurons import mlp_neuron_layers, neuron_mask_plan
    from dfmu_ext.lm.task import TokenSequences, take
    from dfmu_ext.model_io import copy_model
    from dfmu_ext.tasks import lm_parallel
    from dfmu_ext.tasks.lm_finetune import LMFinetuneConfig

    torch.set_num_threads(1)
    dd.init_from_env("cpu")
    comm, stages = dd.ProcessGroupComm(), {}
    _stage(stages, "started")
    h, n_layers, inter, heads, vocab, t, n = SIZES[size]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                                   num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=t)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 4] = -100
    data = TokenSequences(ids, labels)
    layers = mlp_neuron_layers(model, take(data, [0])[0])
    masks = {l.name: (torch.rand(l.units, generator=g) > 0.1).float() for l in layers}
    plan = neuron_mask_plan(layers, masks)
    plan.apply()
    _stage(stages, "model")
    teacher = copy_model(model).eval()
    _stage(stages, "model+teacher")
    if variant == "full":  # the teacher as before issue 28's sharding: whole on every rank
        lm_parallel.shard_teacher = lambda teacher, layers: teacher
    if variant in ("full", "whole-copy"):  # the model's sharded copy made from a whole copy, as before
        lm_parallel.copy_model = lambda module, empty=False: copy_model(module)
    config = LMFinetuneConfig(epochs=1, batch_size=2 * comm.world_size, min_steps=steps, lr=1e-4, distill=5.0)
    obj = lm_parallel.ParallelLMObjective(model, data, config, device=torch.device("cpu"), seed=0, comm=comm,
                                          masks=masks, layers=layers, teacher=teacher)
    _stage(stages, "objective")
    per_step, step = [], obj.backward_step

    def measured_step(loss):  # the resident set after each step: does it settle, or grow?
        step(loss)
        per_step.append(round(_rss_mib(), 1))

    obj.backward_step = measured_step
    t0 = time.perf_counter()
    hist = run_finetune(obj, plan, config, max_steps=steps)
    seconds = time.perf_counter() - t0
    _stage(stages, "after steps")
    state = [v for s in obj.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    held = {"model": _bytes(model.parameters()), "teacher": _bytes(teacher.parameters()),
            "trained copy": _bytes(obj.net.parameters()) if obj.mode == "fsdp" else 0,
            "optimizer": _bytes(state)}
    out = {"variant": variant, "rank": comm.rank, "world_size": comm.world_size, "mode": obj.mode, "size": size,
           "parameters": sum(p.numel() for p in model.parameters()), "steps": hist.steps,
           "s_per_step": round(seconds / max(1, hist.steps), 2), "rss_mib": stages, "rss_per_step_mib": per_step,
           "peak_rss_mib": round(_peak_mib(), 1), "held_mib": {k: round(v / MiB, 1) for k, v in held.items()}}
    gathered = [None] * comm.world_size
    torch.distributed.all_gather_object(gathered, out)
    dd.destroy()
    return gathered


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(variant: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--worker", "--variant",
           variant, "--size", args.size, "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFMU_LM_PARALLEL": "fsdp"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [l[len(TAG):] for l in proc.stdout.splitlines() if l.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant}: torchrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="60m", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--variant", default="all", choices=["all", "full", "whole-copy", "sharded"])
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's dynamic mmap threshold on (the resident set then keeps freed buffers)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ranks = worker(args.size, args.steps, args.variant)
        if int(os.environ.get("RANK", "0")) == 0:
            print(TAG + json.dumps(ranks), flush=True)
        return 0
    variants = ["full", "whole-copy", "sharded"] if args.variant == "all" else [args.variant]
    results = {v: _launch(v, args) for v in variants}
    print(f"allocator: {'glibc default' if args.glibc_default else 'MALLOC_MMAP_THRESHOLD_=' + MMAP_THRESHOLD}")
    print(f"{'variant':10} {'rank':>4} {'mode':>5} {'params':>7} | RSS MiB after: "
          + ", ".join(results[variants[0]][0]["rss_mib"]) + " | peak RSS: objective built, end"
          + " | held MiB: model, teacher, trained copy, optimizer | s/step")
    for v, ranks in results.items():
        for r in ranks:
            held, rss = r["held_mib"], r["rss_mib"]
            print(f"{v:10} {r['rank']:>4} {r['mode']:>5} {r['parameters'] / 1e6:6.1f}M | "
                  + " ".join(f"{now:7.1f}" for now, _ in rss.values())
                  + f" | {rss['objective'][1]:7.1f} {r['peak_rss_mib']:7.1f} | {held['model']:6.1f} "
                  f"{held['teacher']:6.1f} {held['trained copy']:6.1f} {held['optimizer']:6.1f} | {r['s_per_step']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
