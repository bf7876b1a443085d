"""DFMU for causal LMs under torch.distributed: two Gloo ranks on the CPU (127.0.0.1), FSDP2 and DDP.

Each rank runs ``unlearn`` on the tiny LM of ``_lm_tiny`` as torchrun would start it (the environment
variables, then ``dfmu_ext.distributed.init_from_env``); the test process runs the same call in one
process and compares: the scores (summed over the ranks' shards), the masks (bit-identical), the
edit, the guard's numbers, and the weights (equal up to the rounding of the reduction order): on the
tiny LM (FSDP2, DDP, and FSDP2 failing so that DDP runs instead), a two-layer Llama and a two-layer
GPT-2; with dropout (GPT-2), where each rank draws its own masks, the ranks' agreement. The sharded
mask plan is checked on its own against masks applied to the unsharded tensors, and the distillation
teacher FSDP2 builds against an unsharded count (one ``ceil(n / W)``-row shard per rank). The fixture's run:
~30 s on the shared 2-core machine.
"""
import json
import multiprocessing as std_mp
import os
import socket
import time
import traceback

import pytest
import torch

import dfmu_ext
from dfmu_ext import distributed as dd
from dfmu_ext.lm.edit import EditConfig
from dfmu_ext.tasks import LMFinetuneConfig

import _lm_tiny as tl

WORLD = 2
FORGET = [0, 8]          # both facts of the first person
# batches of 5 over a 6-sequence budget: the last batch has one row, so rank 1 runs its weight-0 row
FT = dict(batch_size=5, min_steps=6, lr=1e-2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf(arch: str, dropout: float = 0.0) -> torch.nn.Module:
    """Two-layer Llama and GPT-2 configs: decoder layers that FSDP2 shards one by one
    (``_no_split_modules``); GPT-2's ``Conv1D`` keeps the neurons on the weight's sharded dim 0,
    and its head is tied to the embedding."""
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=tl.VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=tl.T)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=tl.VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=tl.T,
                                  bos_token_id=tl.BOS, eos_token_id=tl.EOS, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)  # dropout draws differ with the rows a process holds
    return transformers.GPT2LMHeadModel(cfg)


ARCHS = ["tiny", "llama", "gpt2", "gpt2-dropout"]
CASES = [("tiny", "fsdp"), ("tiny", "ddp"), ("tiny", "no-fsdp"), ("llama", "fsdp"), ("gpt2", "fsdp")]
DROPOUT = ("gpt2-dropout", "fsdp")   # equal to one process in distribution only: checked for agreement


def _refuse(*args, **kwargs):
    raise NotImplementedError("no FSDP2 here")


def _fresh(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tl.TinyLM() if arch == "tiny" else _hf(arch.split("-")[0], 0.1 if arch.endswith("dropout") else 0.0)


def _original(arch: str) -> torch.nn.Module:
    return tl.train(_fresh(arch), tl.qa_set(16), steps=150)


def _run(model):
    # the projected edit is off by default: turned on so that its broadcast from rank 0 is covered too
    res = dfmu_ext.unlearn(model, tl.qa_set(16), forget_indices=FORGET, retain_fraction=1.0, seed=0,
                           finetune=LMFinetuneConfig(**FT), edit=EditConfig(steps=40))
    guard = res.info["guard"]
    return {"state": tl.state(model), "masks": res.masks, "scores": res.info["scores"], "counts": res.info["counts"],
            "edit_steps": res.info["edit_steps"], "finetune": res.finetune.to_dict(),
            "guard": {k: {kk: v for kk, v in s.items() if kk in ("score", "drop", "within")}
                      for k, s in guard["stages"].items()},
            "parallel": res.info.get("parallel")}


def _sharded_plan_check():
    """A two-layer module under fully_shard (a Linear masked along its inputs, dim 1, and a
    transposed weight masked along dim 0, sharded unevenly: 7 rows on 2 ranks), one AdamW step,
    the plan applied: the gathered weights and moments against masks applied to full tensors."""
    from torch.distributed.fsdp import fully_shard

    from dfmu_ext.finetune import AdamW
    from dfmu_ext.tasks.lm_parallel import ShardedMaskPlan

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 7))
    fully_shard(net)
    opt = AdamW(list(net.parameters()), lr=0.1, weight_decay=0.0)
    net(torch.randn(3, 5)).pow(2).sum().backward()
    opt.step()
    m1, m2 = torch.tensor([1.0, 0, 1, 1, 0]), torch.tensor([0.0, 1, 1, 1, 1, 1, 0])
    w1, w2 = net[0].weight, net[1].weight
    before = [t.full_tensor() for t in (w1, opt.state[w1]["exp_avg"], w2, opt.state[w2]["exp_avg_sq"])]
    ShardedMaskPlan([w1, w2], [m1, m2], [1, 0]).apply(opt)
    after = [t.full_tensor() for t in (w1, opt.state[w1]["exp_avg"], w2, opt.state[w2]["exp_avg_sq"])]
    want = [before[0] * m1, before[1] * m1, before[2] * m2[:, None], before[3] * m2[:, None]]
    return all(torch.equal(a, b) for a, b in zip(after, want)) and bool(before[0][:, 1].abs().sum() > 0)


def _teacher_check(out: str) -> dict:
    """FSDP2's objective for the two-layer Llama with distillation, built directly: per teacher
    parameter (is it a DTensor, sharded on dim 0, its local numel) after construction and again
    after two steps on a 3-sequence budget in batches of 2 (the second batch has one row, so rank 1
    runs its weight-0 row, the teacher's all-gathers included; a rank skipping them would hang);
    whether the caller's reference is the sharded module and its gathered weights the original's."""
    from dfmu_ext.finetune import run_finetune
    from dfmu_ext.lm.neurons import neuron_mask_plan

    def llama():
        m = _fresh("llama")
        m.load_state_dict(torch.load(os.path.join(out, "llama.pt"), weights_only=True))
        return m

    def shards(net):
        return {n: (hasattr(p, "to_local"), [getattr(pl, "dim", None) for pl in getattr(p, "placements", ())] == [0],
                    int(p.to_local().numel()) if hasattr(p, "to_local") else int(p.numel()))
                for n, p in net.named_parameters()}

    model, teacher = llama(), llama().eval()
    original = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    obj, layers, masks, config = _objective(model, teacher)
    built = shards(obj.teacher)
    steps = run_finetune(obj, neuron_mask_plan(layers, masks), config, max_steps=2).steps
    intact = all(torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p, original[n])
                 for n, p in teacher.named_parameters())
    return {"mode": obj.mode, "same_module": obj.teacher is teacher, "built": built, "trained": shards(teacher),
            "steps": steps, "intact": intact}


def _objective(model, teacher):
    """FSDP2's objective for ``model`` on a 3-sequence budget in batches of 2, every neuron kept."""
    from dfmu_ext.lm.neurons import mlp_neuron_layers
    from dfmu_ext.lm.task import take
    from dfmu_ext.tasks.lm_parallel import ParallelLMObjective

    budget = tl.qa_set(3, seed=1)
    layers = mlp_neuron_layers(model, take(budget, [0])[0])
    masks = {l.name: torch.ones(l.units) for l in layers}
    config = LMFinetuneConfig(batch_size=2, min_steps=2, lr=1e-2, distill=5.0)
    obj = ParallelLMObjective(model, budget, config, device=torch.device("cpu"), seed=0, comm=dd.ProcessGroupComm(),
                              masks=masks, layers=layers, teacher=teacher)
    return obj, layers, masks, config


def _copy_check(out: str) -> dict:
    """FSDP2's sharded copy (:func:`fully_sharded_copy`) of each trained model, per architecture: whether
    each parameter's local shard is this rank's rows of the model's weight, the buffers the model's
    (Llama's rotary frequencies), a tied head still the embedding's tensor (GPT-2), and the copy's
    logits the model's."""
    from dfmu_ext.lm.neurons import mlp_neuron_layers
    from dfmu_ext.lm.task import take
    from dfmu_ext.tasks.lm_parallel import fully_sharded_copy, shard_rows

    found = {}
    for arch in ("llama", "gpt2"):
        model = _fresh(arch).eval()
        model.load_state_dict(torch.load(os.path.join(out, f"{arch}.pt"), weights_only=True))
        x = take(tl.qa_set(3, seed=1), [0, 1, 2])[0]
        layers = mlp_neuron_layers(model, x[:1])
        net, shards = fully_sharded_copy(model, [n for n, _ in model.named_parameters()], layers)
        net.eval()
        full, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        embedding, head = net.get_input_embeddings().weight, net.get_output_embeddings().weight
        with torch.no_grad():
            found[arch] = {
                "rows": all(torch.equal(p.to_local(), full[n].detach()[shard_rows(p)]) for n, p in shards.items()),
                "buffers": sorted(n for n, _ in net.named_buffers()) == sorted(buffers)
                and all(torch.equal(b, buffers[n]) for n, b in net.named_buffers()),
                "tied": (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == (
                    embedding is head),
                "logits": torch.equal(net(**x).logits, model(**x).logits)}
    return found


def _failing_after_teacher(real_fully_shard) -> str:
    """FSDP2 sharding the tiny LM's teacher, then failing on the model's copy: DDP cannot take over
    without the whole teacher, so every rank raises (none waits for the others); the message each
    rank gives."""
    import torch.distributed.fsdp as fsdp2

    teacher = _fresh("tiny").eval()

    def teacher_only(module, **kwargs):
        if not any(module is m for m in teacher.modules()):
            raise NotImplementedError("no FSDP2 for the model")
        return real_fully_shard(module, **kwargs)

    fsdp2.fully_shard = teacher_only
    try:
        _objective(_fresh("tiny"), teacher)
    except RuntimeError as exc:
        return str(exc)
    finally:
        fsdp2.fully_shard = real_fully_shard
    return "no error"


#: the fine-tune's all-reduces through DDP in the current case: one per synced backward (bucket 0's call)
REDUCTIONS = {"count": 0}


def _counting_wrap(real_wrap):
    """``ProcessGroupComm.wrap`` whose DDP counts its synced backwards (a comm hook that all-reduces as
    DDP's default does, counting each backward's first bucket)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def wrap(self, model):
        ddp = real_wrap(self, model)

        def hook(state, bucket):
            state["count"] += int(bucket.index() == 0)
            return allreduce_hook(None, bucket)
        ddp.register_comm_hook(REDUCTIONS, hook)
        return ddp
    return wrap


def _worker(rank: int, port: int, out: str) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(WORLD), **{dd.TIMEOUT_ENV: "60"})
        dd.init_from_env("cpu")
        results = {"plan_ok": _sharded_plan_check()}
        os.environ["DFMU_LM_PARALLEL"] = "fsdp"
        results["teacher"] = _teacher_check(out)
        results["copy"] = _copy_check(out)
        import torch.distributed.fsdp as fsdp2
        real_fully_shard = fsdp2.fully_shard
        results["failing_after_teacher"] = _failing_after_teacher(real_fully_shard)
        dd.ProcessGroupComm.wrap = _counting_wrap(dd.ProcessGroupComm.wrap)
        for arch, mode in CASES + [DROPOUT]:
            REDUCTIONS["count"] = 0
            os.environ["DFMU_LM_PARALLEL"] = "fsdp" if mode == "no-fsdp" else mode
            # "no-fsdp": FSDP2 asked for but failing, as on a PyTorch or backend without it: DDP instead
            fsdp2.fully_shard = _refuse if mode == "no-fsdp" else real_fully_shard
            model = _fresh(arch)
            model.load_state_dict(torch.load(os.path.join(out, f"{arch}.pt"), weights_only=True))
            results[arch, mode] = _run(model)
            results[arch, mode]["identical"] = dd.replicas_identical(model)
            results[arch, mode]["ddp_reductions"] = REDUCTIONS["count"]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dd.destroy()
    except BaseException as exc:
        with open(os.path.join(out, f"error{rank}.json"), "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}, f)
        raise


def _context():
    if "forkserver" not in std_mp.get_all_start_methods():
        return std_mp.get_context("spawn")
    ctx = std_mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.fsdp", "dfmu_ext", "_lm_tiny"])
    return ctx


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lm_dist"))
    pytest.importorskip("transformers")
    originals = {arch: _original(arch) for arch in ARCHS}
    for arch, model in originals.items():
        torch.save(model.state_dict(), os.path.join(out, f"{arch}.pt"))
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out), daemon=True) for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, start + 240 - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [open(os.path.join(out, f"error{r}.json")).read() for r in range(WORLD)
              if os.path.exists(os.path.join(out, f"error{r}.json"))]
    assert not hung and [p.exitcode for p in procs] == [0] * WORLD, (hung, errors)
    seconds = time.monotonic() - start
    return {"ranks": [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)],
            "original": {arch: tl.state(m) for arch, m in originals.items()},
            "single": {arch: _run(m) for arch, m in originals.items()}, "seconds": seconds}


@pytest.mark.slow  # two worker processes
def test_sharded_mask_plan_masks_local_shards_and_moments(lm_run):
    assert all(r["plan_ok"] for r in lm_run["ranks"])


@pytest.mark.slow  # two worker processes
def test_fsdp2_teacher_holds_one_shard_per_rank(lm_run):
    """Under FSDP2 each rank's distillation teacher is DTensors sharded on dim 0, before and after
    the steps' forwards (the root resharded too), each holding its ``ceil(rows / W)``-row chunk of
    a count taken here from an unsharded model of the same config: half of the weights per rank."""
    full = {n: (int(p.shape[0]), int(p.numel())) for n, p in _fresh("llama").named_parameters()}
    ranks = [r["teacher"] for r in lm_run["ranks"]]
    total = sum(numel for _, numel in full.values())
    for r, got in enumerate(ranks):
        assert got["mode"] == "fsdp" and got["same_module"] and got["intact"] and got["steps"] == 2
        for when in ("built", "trained"):
            assert got[when].keys() == full.keys()
            for name, (rows, numel) in full.items():
                is_dtensor, on_dim0, local = got[when][name]
                chunk = -(-rows // WORLD)
                assert is_dtensor and on_dim0, (when, name)
                assert local == max(0, min(chunk, rows - r * chunk)) * (numel // rows), (when, name)
            assert abs(sum(local for *_, local in got[when].values()) / total - 1 / WORLD) < 0.02
    assert sum(sum(local for *_, local in got["built"].values()) for got in ranks) == total


@pytest.mark.slow  # two worker processes
def test_fsdp2_copy_is_the_models_rows_buffers_and_ties(lm_run):
    """The sharded copy, made empty and then filled (no whole second model), holds on each rank its
    rows of every weight, the model's buffers and its tied head, and answers as the model does."""
    for r in lm_run["ranks"]:
        for arch, got in r["copy"].items():
            assert got == {"rows": True, "buffers": True, "tied": True, "logits": True}, (arch, got)


def test_empty_copy_allocates_nothing_and_keeps_the_ties():
    """copy_model(empty=True): every parameter and buffer of the copy on the meta device with the
    model's shape, dtype and requires_grad, a weight tied in the model one tensor in the copy, the
    model's own tensors untouched."""
    from dfmu_ext.model_io import copy_model

    for arch in ("llama", "gpt2"):
        model = _fresh(arch)
        model.get_input_embeddings().weight.requires_grad_(False)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        net = copy_model(model, empty=True)
        mine = dict(model.named_parameters())
        assert dict(net.named_parameters()).keys() == mine.keys()
        for name, p in net.named_parameters():
            assert p.is_meta and p.shape == mine[name].shape and p.dtype == mine[name].dtype
            assert p.requires_grad == mine[name].requires_grad
        assert all(b.is_meta for b in net.buffers()) and len(list(net.buffers())) == len(list(model.buffers()))
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert (net.get_input_embeddings().weight is net.get_output_embeddings().weight) == tied
        assert tied == (arch == "gpt2")
        assert all(torch.equal(t, before[n]) and not t.is_meta for n, t in model.state_dict().items())


def test_vocabulary_matrices_are_units_only_where_their_weights_are_their_own():
    """The teacher's embedding and head get FSDP2 units of their own only where untied: a tied head
    (GPT-2, a tied Llama) shares its weight, which must stay in one unit (the root)."""
    from dfmu_ext.tasks.lm_parallel import transformer_blocks, vocabulary_matrices

    transformers = pytest.importorskip("transformers")
    llama = _hf("llama")
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**llama.config.to_dict(),
                                                                     "tie_word_embeddings": True}))
    tiny = _fresh("tiny")
    assert vocabulary_matrices(tiny, []) == [tiny.tok]   # no getter for the head: the embedding alone
    got = vocabulary_matrices(llama, transformer_blocks(llama, []))
    assert got == [llama.get_input_embeddings(), llama.get_output_embeddings()]
    for model in (tied, _hf("gpt2")):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert vocabulary_matrices(model, transformer_blocks(model, [])) == []


@pytest.mark.slow  # two worker processes
def test_fsdp2_failing_after_the_teacher_raises_on_every_rank(lm_run):
    want = ("FSDP2 failed after sharding the distillation teacher (fully_shard failed (NotImplementedError: "
            "no FSDP2 for the model)): run with DFMU_LM_PARALLEL=ddp")
    assert [r["failing_after_teacher"] for r in lm_run["ranks"]] == [want] * WORLD


@pytest.mark.slow  # two worker processes
def test_lm_unlearn_two_ranks_with_dropout_agree(lm_run):
    """With dropout each rank draws its own masks: the ranks still end bit-identical, with one
    process's neuron masks, pruned neurons at zero, and the guard's decisions taken together."""
    arch, mode = DROPOUT
    r0, r1 = (r[arch, mode] for r in lm_run["ranks"])
    one = lm_run["single"][arch]
    assert r0["identical"] and r1["identical"] and r0["guard"] == r1["guard"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    for name, m in one["masks"].items():
        assert torch.equal(r0["masks"][name], m), name
        assert torch.count_nonzero(r0["state"][name + ".weight"][m == 0]) == 0, name
    assert r0["finetune"]["steps"] >= 6


@pytest.mark.slow  # two worker processes
@pytest.mark.parametrize("arch, mode", CASES)
def test_lm_unlearn_two_ranks_equals_one_process(lm_run, arch, mode):
    one = lm_run["single"][arch]
    r0, r1 = (r[arch, mode] for r in lm_run["ranks"])
    want = {"mode": "fsdp2" if mode == "fsdp" else "ddp", "world_size": 2}
    if mode == "no-fsdp":
        want["fallback"] = "fully_shard failed (NotImplementedError: no FSDP2 here)"
    assert r0["parallel"] == want
    assert one["parallel"] is None
    # DDP: one all-reduce per step, however many terms (the budget's, the forget term's, the neighbours')
    # each step's backwards add up; FSDP2's reduce-scatters are not DDP's
    assert r0["ddp_reductions"] == (r0["finetune"]["steps"] if mode != "fsdp" else 0)
    # every rank holds the whole batch's scores, and the masks are one process's, bit for bit
    for got in (r0, r1):
        assert got["counts"] == one["counts"]
        for name, s in one["scores"].items():
            torch.testing.assert_close(got["scores"][name], s, rtol=1e-5, atol=1e-7)
        assert got["masks"].keys() == one["masks"].keys()
        for name, m in one["masks"].items():
            assert torch.equal(got["masks"][name], m), name
    assert sum(int((m == 0).sum()) for m in one["masks"].values()) > 0, "nothing was pruned: the test is vacuous"
    # the replicas are identical, and the same decisions were taken as in one process
    assert r0["identical"] and r1["identical"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["edit_steps"] == one["edit_steps"] > 0
    for key in ("steps", "samples", "recovery_steps"):
        assert r0["finetune"][key] == one["finetune"][key], key
    assert r0["guard"].keys() == one["guard"].keys()
    for stage, s in one["guard"].items():
        assert r0["guard"][stage].get("within") == s.get("within"), stage
        assert abs(r0["guard"][stage]["score"] - s["score"]) < 1e-5, stage
    # the weights: one process's up to the rounding of the reduction order; pruned neurons exactly zero
    assert one["finetune"]["steps"] >= 6
    for k, v in one["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    moved = max(float((v - lm_run["original"][arch][k]).abs().max()) for k, v in one["state"].items())
    assert moved > 1e-2, "the fine-tune did not move the weights: the comparison is vacuous"
    for name, m in one["masks"].items():  # Conv1D (GPT-2) holds the neurons on dim 0, a Linear on dim 1
        w = r0["state"][name + ".weight"]
        assert torch.count_nonzero(w[m == 0] if arch == "gpt2" else w[:, m == 0]) == 0, name


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFMU_TEST_TORCHRUN") != "1", reason="real torchrun run: set DFMU_TEST_TORCHRUN=1")
def test_torchrun_cli_forget_lm(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m dfmu_ext forget --task lm`: rank 0 alone prints and writes; the
    checkpoint is one process's up to rounding, its record names FSDP2 and verifies (~60 s)."""
    import subprocess
    import sys

    from dfmu_ext import cli

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "lm.pt"
    small = ["--task", "lm", "--people", "8", "--epochs", "2", "--device", "cpu", "--quiet"]
    assert cli.main(["train", *small, "--out", str(ckpt)]) == 0
    forget = ["forget", "--task", "lm", "--ckpt", str(ckpt), "--forget-people", "0.25", "--device", "cpu"]
    assert cli.main([*forget, "--out", str(tmp_path / "one" / "f.pt"), "--quiet"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", dd.TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "dfmu_ext", *forget, "--out",
           str(tmp_path / "two" / "f.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DFMU ") == 1 and proc.stdout.count("wrote ") == 1, proc.stdout
    record = json.loads((tmp_path / "two" / "f.record.json").read_text())
    assert record["config"]["world_size"] == 2 and record["config"]["parallel"]["mode"] == "fsdp2"
    assert cli.main(["verify", "--record", str(tmp_path / "two" / "f.record.json"), "--weights",
                     str(tmp_path / "two" / "f.pt")]) == 0
    one = torch.load(tmp_path / "one" / "f.pt", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two" / "f.pt", weights_only=True)["state_dict"]
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)
