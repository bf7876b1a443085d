"""DFMU's causal-LM path against model size: random-init Llama configs of about 10M, 100M, 400M and
1B parameters, fp32 and bf16, sequences of 128-512 tokens.

    python benchmarks/lm_scale.py [--device cpu|cuda] [--sizes 10m,100m] [--grid small|full] [--out FILE.md]
                                  [--only dfmu,finetune,plain] [--dtypes bf16] [--seqs 256]

For each (size, dtype, sequence length, batch) row it measures, each in a fresh child process:

- ``score``: the neuron scoring pass (:func:`dfmu_ext.lm.neurons.score_neurons`, one forward and one
  backward to the embeddings' outputs) on one batch, half forget and half retain sequences;
- ``plain``: a plain forward+backward of the same batch (the next-token loss, every parameter's
  gradient), and ``plain+ckpt`` the same with the model's gradient checkpointing on;
- ``dfmu``: the whole :func:`dfmu_ext.unlearn` with DFMU's defaults (no retain-projected edit) on a
  tiny budget (8 retain sequences, 4 forgotten, the scoring pass on one batch, one fine-tune epoch with
  the forget term and the distillation to the original; guard off), ``dfmu-edit`` the same with a
  2-step edit (off by default), ``dfmu-nodistill`` without the distillation term (its teacher copy
  and teacher logits), ``dfmu-eager`` with the distillation as it was computed before issue 28's lean
  :func:`dfmu_ext.finetune.distill_loss` (eager ``log_softmax``/``kl_div`` on float32 copies: the
  "before" of that change), ``dfmu+ckpt`` with gradient checkpointing on, ``dfmu-relearn`` with the
  opt-in simulated relearning step (``relearn_step=1e-3``, moving the weights the fine-tune leaves frozen)
  and ``dfmu-relearn-trained`` the same moving the trained ones;
- ``finetune``: one epoch of plain fine-tuning (AdamW, every parameter) on the same 8 sequences;
- ``targets``: the LM forget term's targets at TOFU forget10's shape (400 forget sequences of 128
  tokens, a 128k vocabulary, k=200) on a 10M model, stored sparsely (the dense q: 26 GB).

Memory is the child's peak resident set above its resident set just before the measured call
(on CPU: the kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` after the
model is built, with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors go back to the kernel;
on CUDA: ``torch.cuda.max_memory_allocated`` above ``memory_allocated``). "peak" is the whole
process's (model included); a ``dfmu`` row also has each stage's peak (``stage_peaks_mb``, CPU). Its
swapped neighbours are ``--neighbours`` (128; DFMU's default 512): the template pass reads them 64 at a
time and holds two batches' logits at once from the second on, so two batches reach the default's peak
in about 1/4 of its time. Times are one call each (a guide only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from lm_scale_probes import StagePeaks, eager_distill_loss, hwm_kb, reset_hwm  # noqa: E402

PEAKS = StagePeaks()

#: Llama shapes (tied embeddings; 1b is Llama-3.2-1B's shape with its 128k vocabulary).
SIZES = {
    "10m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=16000),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
    "400m": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=18, num_attention_heads=20,
                 num_key_value_heads=4, vocab_size=32000),
    "10m-128k": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}

#: (size, dtype, seq, batch, measurements). "full" adds the large sizes to "small" (run once, alone on the
#: machine: the 1B row holds about 10 GB). A dfmu row runs DFMU's forget side too (up to 300 steps): 215 s for
#: the 10M row at 256 tokens on 2 CPU cores (2026-12-07), so the 100M rows want a larger --timeout.
GRIDS = {
    "small": [
        ("10m-128k", "fp32", 128, 400, ("targets",)),
        ("10m", "fp32", 128, 4, ("score", "plain", "plain+ckpt", "dfmu", "dfmu-nodistill", "finetune")),
        ("10m", "fp32", 256, 4, ("plain", "finetune", "dfmu", "dfmu-eager", "dfmu-edit", "dfmu-relearn",
                                 "dfmu-relearn-trained")),
        ("10m", "fp32", 512, 4, ("score", "plain", "plain+ckpt", "dfmu", "finetune")),
        ("10m", "bf16", 256, 4, ("score", "plain", "dfmu", "dfmu-eager", "finetune")),
        ("100m", "fp32", 256, 4, ("score", "plain", "plain+ckpt", "dfmu", "dfmu-eager", "dfmu-edit", "dfmu-nodistill",
                                  "finetune")),
        ("100m", "bf16", 256, 4, ("score", "plain", "dfmu", "dfmu-eager", "finetune")),
    ],
    "large": [
        ("1b", "bf16", 256, 4, ("score", "plain", "finetune", "dfmu")),
        ("400m", "bf16", 256, 4, ("score", "plain", "plain+ckpt", "finetune", "dfmu", "dfmu-eager", "dfmu-edit")),
    ],
}
GRIDS["full"] = GRIDS["small"] + GRIDS["large"]


# ----------------------------------------------------------------------------------------- child side

def _build(size: str, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in the dtype: no fp32 copy of a 1B model first
    try:
        torch.manual_seed(0)
        with torch.device(device):  # made where it runs: no host copy of the weights on a GPU
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _data(n: int, seq: int, vocab: int):
    import torch
    from dfmu_ext.lm.task import TokenSequences

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return TokenSequences(ids, ids.clone())


def _measure(spec: dict) -> dict:
    import gc

    import torch
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    what, seq, batch = spec["what"], spec["seq"], spec["batch"]
    model = _build(spec["size"], dtype, device)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    if what.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run = _runner(what, model, seq, batch, vocab, device, spec.get("neighbours", 512))

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_hwm()
        base = PEAKS.base = hwm_kb()[0] * 1024
    start = time.perf_counter()
    extra = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(hwm_kb()[1] * 1024, PEAKS.top)
    return {"params": params, "base_mb": base / 2**20, "peak_mb": peak / 2**20, "delta_mb": (peak - base) / 2**20,
            "seconds": seconds, **(extra or {})}


def spec_refs(seq: int) -> int:
    """Reference sequences for the targets measurement: 8,192 positions (the search is a guide, the
    storage is the point: it does not depend on the reference count)."""
    return max(1, 8192 // seq)


def _runner(what: str, model, seq: int, batch: int, vocab: int, device, neighbours: int = 512):
    """The measured call, with everything it needs (data, layers) made beforehand."""
    import torch
    from dfmu_ext.lm.neurons import mlp_neuron_layers, score_neurons
    from dfmu_ext.lm.task import forward_logits, lm_loss, take

    kind = what.split("+")[0]
    if kind == "targets":  # TOFU forget10's shape: 400 forget sequences x 128 tokens, 128k vocabulary
        from dfmu_ext.lm.targets import forget_targets

        n_f, n_r = 400, spec_refs(seq)
        xf, yf = take(_data(n_f, seq, vocab), list(range(n_f)))
        xr, yr = take(_data(n_r, seq, vocab), list(range(n_r)))
        layer = mlp_neuron_layers(model, xf[:1])[0].layer

        def targets():
            q, scored = forget_targets(model, layer, (xf.to(device), yf), (xr.to(device), yr), vocab, 200)
            dense = scored.numel() * vocab * 4
            return {"forget_positions": int(scored.sum()), "reference_positions": n_r * (seq - 1),
                    "sparse_mb": (q.ids.numel() * 8 + q.weights.numel() * 4 + q.index.numel() * 8) / 2**20,
                    "dense_mb": dense / 2**20}
        return targets
    if kind in ("score", "plain"):
        x, y = take(_data(batch, seq, vocab), list(range(batch)))
        x, y = x.to(device), y.to(device)
        if kind == "score":
            layers = mlp_neuron_layers(model, x[:1])
            is_forget = torch.arange(batch) < batch // 2
            return lambda: score_neurons(model, x, y, is_forget, layers) and None

        def plain():
            model.train()
            lm_loss(forward_logits(model, x), y).backward()
            model.zero_grad(set_to_none=False)  # the gradients stay allocated, as in a training loop
        return plain

    # dfmu / finetune: 24 sequences, 4 forgotten, a budget of 8 retain sequences (retain_fraction 0.4)
    data = _data(24, seq, vocab)
    forget = list(range(4))
    if kind == "finetune":
        from dfmu_ext.lm.task import batches

        budget = data.subset(list(range(4, 12)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def finetune():
            model.train()
            for xb, yb in batches(budget, batch, shuffle=True, seed=0, device=device):
                opt.zero_grad(set_to_none=True)
                lm_loss(forward_logits(model, xb), yb).backward()
                opt.step()
        return finetune

    from dfmu_ext import unlearn
    from dfmu_ext.lm.edit import EditConfig
    from dfmu_ext.lm.targets import LMForgetTermConfig
    from dfmu_ext.tasks import LMFinetuneConfig

    ft = LMFinetuneConfig(epochs=1, batch_size=batch, min_steps=0, distill=0.0 if kind == "dfmu-nodistill" else 5.0,
                          neighbours=neighbours)
    relearn = dict(relearn_step=1e-3, relearn_moves="trained" if kind.endswith("trained") else "frozen")
    term = LMForgetTermConfig(batch_size=max(1, batch // 2), references=8, k=20,
                              **(relearn if kind.startswith("dfmu-relearn") else {}))
    # DFMU's default is no edit (EditConfig(steps=0)); dfmu-edit measures the opt-in 2-step edit
    edit = EditConfig(steps=2, batch_size=max(1, batch // 2), references=4) if kind == "dfmu-edit" else None
    if kind == "dfmu-eager":
        import dfmu_ext.tasks.lm_finetune as lm_finetune
        lm_finetune.distill_loss = eager_distill_loss  # this child only: the LM objective's distillation

    if device.type == "cpu":  # each stage's peak, to tell which one sets DFMU's
        import importlib

        from dfmu_ext.tasks.causal_lm import CausalLMTask
        orchestration = importlib.import_module("dfmu_ext.unlearn")
        for owner, name, label in [(CausalLMTask, "forget_targets", "targets"), (CausalLMTask, "prune", "scoring"),
                                   (CausalLMTask, "prepare", "edit"), (orchestration, "run_finetune", "finetune"),
                                   (orchestration, "_forget_side", "forget_side")]:
            PEAKS.wrap(owner, name, label)

    def dfmu():
        r = unlearn(model, data, forget_indices=forget, retain_fraction=0.4, score_samples=batch, finetune=ft,
                    forget_term=term, edit=edit, guard=False, device=device, seed=0)
        return {"stages": {k: round(v, 2) for k, v in r.timings.items()}, "stage_peaks_mb": {
            k: round((v - PEAKS.base) / 2**20) for k, v in PEAKS.peaks.items()}, "stage_starts_mb": {
            k: round((v - PEAKS.base) / 2**20) for k, v in PEAKS.starts.items()}}
    return dfmu


# ---------------------------------------------------------------------------------------- parent side

def _child(spec: dict, timeout: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1])


def _table(rows: list[dict]) -> str:
    head = ("| size | params | dtype | seq x batch | measured | peak above start (MB) | / plain fwd+bwd "
            "| process peak (MB) | s |")
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["size"], r["dtype"], r["seq"], r["batch"]): r.get("delta_mb") for r in rows if r["what"] == "plain"}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | | {r['dtype']} | {r['seq']} x {r['batch']} | {r['what']} "
                       f"| error: {r['error']} | | | |")
            continue
        base = plain.get((r["size"], r["dtype"], r["seq"], r["batch"]))
        ratio = f"{r['delta_mb'] / base:.2f}" if base and r["what"] != "plain" else ""
        out.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['seq']} x {r['batch']} | {r['what']} "
                   f"| {r['delta_mb']:.0f} | {ratio} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(out)


def _growth(rows: list[dict]) -> str:
    """DFMU's peak over the fine-tune's, per size (the target: it does not grow with size)."""
    got = {}
    for r in rows:
        if "error" not in r and r["what"] in ("dfmu", "dfmu-eager", "finetune"):
            got.setdefault((r["size"], r["dtype"], r["seq"]), {})[r["what"]] = r
    lines = [f"- forget targets, {r['size']} ({r['forget_positions']} forget x {r['reference_positions']} reference "
             f"positions, k=200): stored {r['sparse_mb']:.0f} MB (dense q would be {r['dense_mb']:.0f} MB); peak "
             f"{r['delta_mb']:.0f} MB above start, {r['seconds']:.1f} s"
             for r in rows if r["what"] == "targets" and "error" not in r]
    for (size, dtype, seq), d in got.items():
        if "dfmu" in d and "finetune" in d:
            ratio = d['dfmu']['delta_mb'] / d['finetune']['delta_mb']
            eager = (f" (eager distillation: {d['dfmu-eager']['delta_mb']:.0f} MB, ratio "
                     f"{d['dfmu-eager']['delta_mb'] / d['finetune']['delta_mb']:.2f})") if "dfmu-eager" in d else ""
            lines.append(f"- {size} {dtype} seq {seq}: DFMU {d['dfmu']['delta_mb']:.0f} MB, fine-tune epoch "
                         f"{d['finetune']['delta_mb']:.0f} MB (ratio {ratio:.2f}){eager}; "
                         f"time {d['dfmu']['seconds']:.1f} s vs {d['finetune']['seconds']:.1f} s; DFMU stages "
                         f"{d['dfmu'].get('stages')}; stage peaks above start (MB) {d['dfmu'].get('stage_peaks_mb')}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", default="small", choices=sorted(GRIDS))
    p.add_argument("--sizes", default=None, help="comma-separated subset of the grid's sizes (10m,100m,400m,1b)")
    p.add_argument("--only", default=None, help="comma-separated subset of the measurements (score,plain,...)")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of the grid's dtypes (fp32,bf16)")
    p.add_argument("--seqs", default=None, help="comma-separated subset of the grid's sequence lengths")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--neighbours", type=int, default=128, help="DFMU's swapped neighbours (its default: 512; "
                   "two template batches of 64 reach its peak)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    p.add_argument("--out", default=None, help="Markdown file to write (also printed)")
    p.add_argument("--json", default=None, help="JSON lines file to append every row to")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(json.loads(args.child))))
        return 0
    import torch
    import transformers

    sizes = set(args.sizes.split(",")) if args.sizes else None
    only = set(args.only.split(",")) if args.only else None
    if sizes and not sizes <= set(SIZES):
        raise SystemExit(f"unknown sizes {sorted(sizes - set(SIZES))}; choose from {sorted(SIZES)}")
    grid = GRIDS["full" if sizes and sizes & {"400m", "1b"} else args.grid]
    rows = []
    dtypes = set(args.dtypes.split(",")) if args.dtypes else None
    seqs = {int(v) for v in args.seqs.split(",")} if args.seqs else None
    for size, dtype, seq, batch, whats in grid:
        if (sizes and size not in sizes) or (dtypes and dtype not in dtypes) or (seqs and seq not in seqs):
            continue
        for what in whats:
            if only and what not in only:
                continue
            spec = {"size": size, "dtype": dtype, "seq": seq, "batch": batch, "what": what, "device": args.device,
                    "threads": args.threads, "neighbours": args.neighbours}
            r = {**spec, **_child(spec, args.timeout)}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    text = "\n".join([f"# Causal-LM scale ({args.device})", "",
                      f"{datetime.date.today()}, {device}, torch {torch.__version__}, transformers "
                      f"{transformers.__version__}; load average before: {os.getloadavg()[0]:.1f}", "",
                      _table(rows), "", _growth(rows), ""])
    print(text)
    if args.out:
        from dfmu_ext._io import atomic_write_bytes
        atomic_write_bytes(args.out, text.encode())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
