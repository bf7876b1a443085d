"""FSDP2 for DFMU's causal-LM fine-tune on the device at hand (benchmarks/gpu_check.sh, part "fsdp").

    torchrun --nproc_per_node N benchmarks/lm_fsdp_check.py [--device cuda|cpu] [--size small|100m] [--steps 20]

It joins the process group torchrun describes (NCCL on CUDA, Gloo on the CPU) and runs:

1. ``objective`` (any world size, 1 included): a random-init Llama with about 10% of every MLP's
   neurons masked, ``--steps`` fine-tune steps (next-token loss + distillation to the original) of
   :class:`dfmu_ext.tasks.lm_parallel.ParallelLMObjective` (``fully_shard`` per decoder layer and on
   the root; the local-shard masks on the weights and both Adam moments) against the one-process
   :class:`dfmu_ext.tasks.lm_finetune.LMObjective` from the same weights on the same batches: the
   largest weight difference (the reduction order's rounding only), the masked neurons' largest
   value (must be exactly 0), seconds per step and peak device memory of each.
2. ``pipeline`` (world size >= 2 only): the whole :func:`dfmu_ext.unlearn` on every rank: masks and
   replicas identical on every rank, ``info["parallel"]``.

One GPU cannot shard across ranks: with ``--nproc_per_node 1`` part 1 runs FSDP2 with a single shard
(its hooks, all-gathers, reduce-scatters, DTensor optimizer and masks on CUDA, through NCCL) and part 2
is skipped; the line says so. Rank 0 prints one line per part and a JSON line; the exit status is 1
when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

from dfmu_ext import distributed as dd  # noqa: E402
from dfmu_ext.finetune import run_finetune  # noqa: E402
from dfmu_ext.lm.neurons import mlp_neuron_layers, neuron_mask_plan  # noqa: E402
from dfmu_ext.lm.task import TokenSequences  # noqa: E402
from dfmu_ext.tasks.lm_finetune import LMFinetuneConfig, LMObjective  # noqa: E402
from dfmu_ext.tasks.lm_parallel import ParallelLMObjective  # noqa: E402

SIZES = {  # hidden, layers, intermediate, heads, vocab, sequence length, sequences
    "small": (64, 2, 160, 4, 256, 32, 32),
    "100m": (768, 8, 2048, 12, 32000, 256, 64),
}


def _llama(size: str, device):
    import transformers

    h, n, inter, heads, vocab, t, _ = SIZES[size]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                                   num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=t)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device)


def _data(size: str) -> TokenSequences:
    _, _, _, _, vocab, t, n = SIZES[size]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 4] = -100  # a prompt
    return TokenSequences(ids, labels)


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def objective_check(size: str, steps: int, device, comm) -> dict:
    model = _llama(size, device)
    data = _data(size)
    layers = mlp_neuron_layers(model, _first(data, device))
    g = torch.Generator().manual_seed(2)
    masks = {l.name: (torch.rand(l.units, generator=g) > 0.1).float() for l in layers}
    neuron_mask_plan(layers, masks).apply()
    teacher = copy.deepcopy(model).eval()
    ref = copy.deepcopy(model)
    ref_layers = mlp_neuron_layers(ref, _first(data, device))
    config = LMFinetuneConfig(epochs=1, batch_size=max(2, len(data) // max(1, steps)), min_steps=steps, lr=1e-3)
    out = {}
    for name, net, lays in (("one-process", ref, ref_layers), ("fsdp2", model, layers)):
        _reset(device)
        if name == "fsdp2":
            obj = ParallelLMObjective(net, data, config, device=device, seed=0, comm=comm, masks=masks, layers=lays,
                                      teacher=teacher)
        else:
            obj = LMObjective(net, data, config, device=device, seed=0, layers=lays, teacher=teacher)
        plan = neuron_mask_plan(lays, masks)
        t0 = time.perf_counter()
        hist = run_finetune(obj, plan, config, max_steps=steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = {"s_per_step": (time.perf_counter() - t0) / max(1, hist.steps), "steps": hist.steps,
                     "peak_gib": _peak(device), "mode": getattr(obj, "mode", None)}
    diff = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    masked = max(float(l.weight.detach()[:, masks[l.name] == 0].abs().max()) for l in layers)
    # FSDP2 sharded the teacher in place (every rank gathers it here, in the same order)
    start = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in teacher.state_dict().values()]
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), start))
    return {"max_diff": diff, "masked_max": masked, "moved": moved, **{k: v for k, v in out.items()}}


def _first(data: TokenSequences, device):
    from dfmu_ext.lm.task import take

    return take(data, [0])[0].to(device)


def pipeline_check(device) -> dict:
    import dfmu_ext

    model = _llama("small", device)
    res = dfmu_ext.unlearn(model, _data("small"), forget_indices=[0, 1, 2, 3], retain_fraction=1.0, seed=0,
                           finetune=LMFinetuneConfig(batch_size=6, min_steps=4), device=device)
    digest = dd.state_digest(model)
    mask_bytes = b"".join(m.cpu().numpy().tobytes() for m in res.masks.values())
    seen: list = [None] * dd.get_world_size()
    torch.distributed.all_gather_object(seen, (digest, mask_bytes))
    return {"parallel": res.info.get("parallel"), "replicas_identical": len({s[0] for s in seen}) == 1,
            "masks_identical": len({s[1] for s in seen}) == 1, "pruned": int(sum((m == 0).sum() for m in res.masks.values()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import torch.distributed as dist

    device, created = dd.init_from_env(args.device)
    if not dist.is_initialized():  # torchrun --nproc_per_node 1 sets WORLD_SIZE=1: join a group of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dd.timeout_from_env())
        created = True
    comm, world, ok = dd.ProcessGroupComm(), dist.get_world_size(), True
    try:
        result = {"world_size": world, "device": str(device), "backend": dist.get_backend(), "size": args.size}
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        obj = objective_check(args.size, args.steps, device, comm)
        result["objective"] = obj
        good = obj["max_diff"] < 1e-3 and obj["masked_max"] == 0.0 and obj["moved"] > 0 and obj["fsdp2"]["mode"] == "fsdp"
        ok &= good
        if comm.is_main:
            note = " (one shard: one device cannot shard across ranks)" if world == 1 else ""
            print(f"objective {'OK' if good else 'FAILED'}: FSDP2 x{world}{note} vs one process, {obj['fsdp2']['steps']} "
                  f"steps: max |dw| {obj['max_diff']:.2e}, masked max {obj['masked_max']:.1e}, "
                  f"{1e3 * obj['fsdp2']['s_per_step']:.1f} vs {1e3 * obj['one-process']['s_per_step']:.1f} ms/step, "
                  f"peak {obj['fsdp2']['peak_gib']} vs {obj['one-process']['peak_gib']} GiB", flush=True)
        if world >= 2:
            pipe = pipeline_check(device)
            result["pipeline"] = pipe
            good = pipe["replicas_identical"] and pipe["masks_identical"] and pipe["parallel"]["mode"] == "fsdp2"
            ok &= good
            if comm.is_main:
                print(f"pipeline {'OK' if good else 'FAILED'}: {pipe}", flush=True)
        elif comm.is_main:
            print("pipeline skipped: world size 1 (unlearn shards only across >= 2 ranks)", flush=True)
        if comm.is_main:
            print(json.dumps(result), flush=True)
    finally:
        if created:
            dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
