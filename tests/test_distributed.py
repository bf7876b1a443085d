"""DFMU under torch.distributed: two Gloo processes on the CPU (127.0.0.1 only), bounded by timeouts.

The workers are module-level functions run in fresh processes; each writes what it observed
(tensors, histories, errors, its stdout) to files that the test process compares. They are started
through a ``forkserver`` that has imported torch and dfmu_ext once: a plain ``spawn`` re-imports
torch (and torch._dynamo, which the optimizer pulls in) in every worker, which cost ~10 s per
process on the shared 2-core machines. The workers join the group through the same environment
variables torchrun sets (``dfmu_ext.distributed.init_from_env``); a real ``torchrun`` run of the CLI
is in ``test_torchrun_cli_forget`` (opt-in: DFMU_TEST_TORCHRUN=1, ~30 s).
"""
import copy
import json
import multiprocessing as std_mp
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

import dfmu_ext
from dfmu_ext import cli
from dfmu_ext import training
from dfmu_ext.zoo import data, models
from dfmu_ext import distributed as dd
from dfmu_ext.splits import split_forget_retain, take_batch
from dfmu_ext.finetune import FinetuneConfig

WORLD = 2
CLASSES = [3]
FT = dict(epochs=3, batch_size=64, window=256)   # small enough to stop early inside epoch 2 or 3
RETAIN_FRACTION = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, port: int, timeout_s: float) -> None:
    """What torchrun would set, then the library's own initialisation."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), **{dd.TIMEOUT_ENV: str(timeout_s)})
    device, created = dd.init_from_env("cpu")
    assert created and device.type == "cpu" and dd.is_distributed() and dd.get_rank() == rank


def _record_error(out: str, rank: int, exc: BaseException) -> None:
    with open(os.path.join(out, f"error{rank}.json"), "w") as f:
        json.dump({"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}, f)


_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel", "sklearn.datasets",
            "dfmu_ext", "dfmu_ext.cli", "dfmu_ext.eval", "dfmu_ext.experiments"]


def _context():
    """A forkserver context preloaded with the heavy imports (spawn where there is no forkserver)."""
    if "forkserver" not in std_mp.get_all_start_methods():
        return std_mp.get_context("spawn")
    ctx = std_mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _spawn(target, args, timeout_s: float) -> list[int]:
    """Start WORLD processes ``target(rank, *args)``; wait at most ``timeout_s``; return exit codes.

    A process still alive at the deadline is killed and the test fails: nothing may hang.
    """
    ctx = _context()
    procs = [ctx.Process(target=target, args=(rank, *args), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s"
    return [p.exitcode for p in procs]


def _model(info):
    return models.build_model("cnn", info.in_channels, info.num_classes, info.image_size, width=8)


def _scoring_batch(train, n=96, seed=0):
    forget, retain = split_forget_retain(train, CLASSES)
    g = torch.Generator().manual_seed(seed)
    xf, yf = take_batch(forget, torch.randperm(len(forget), generator=g)[: n // 2].tolist())
    xr, yr = take_batch(retain, torch.randperm(len(retain), generator=g)[: n // 2].tolist())
    return torch.cat([xf, xr]), torch.cat([yf, yr])


# --------------------------------------------------------------------------------------------
# workers (run in spawned processes)
# --------------------------------------------------------------------------------------------

def _pipeline_worker(rank: int, port: int, cli_port: int, out: str) -> None:
    try:
        _join_group(rank, port, timeout_s=30)
        train, _, info = data.load_dataset("digits")
        state = torch.load(os.path.join(out, "original.pt"), weights_only=True)
        batch = torch.load(os.path.join(out, "batch.pt"), weights_only=True)

        model = _model(info)
        model.load_state_dict(state)
        pr = dfmu_ext.score_and_prune(model, dd.current_comm().shard(batch), CLASSES)
        torch.save({"scores": pr.scores, "counts": pr.counts, "masks": pr.masks,
                    "pre_acc": pr.pre_prune_retain_accuracy}, os.path.join(out, f"prune{rank}.pt"))

        model = _model(info)
        model.load_state_dict(state)
        res = dfmu_ext.unlearn(model, train, CLASSES, RETAIN_FRACTION, finetune=FinetuneConfig(**FT), seed=0,
                               progress=False)
        same = dd.replicas_identical(model)
        torch.save({"state": model.state_dict(), "masks": res.masks, "finetune": res.finetune.to_dict(),
                    "identical": same, "digest": dd.state_digest(model)}, os.path.join(out, f"unlearn{rank}.pt"))
        dd.destroy()

        # The CLI as torchrun would run it: a fresh group from the environment, rank 0 alone
        # evaluates, prints and writes, and rank 1 leaves while rank 0 is still evaluating.
        os.environ["MASTER_PORT"] = str(cli_port)
        sys.stdout = open(os.path.join(out, f"stdout{rank}.txt"), "w")
        rc = cli.main(["forget", "--ckpt", os.path.join(out, "mlp.pt"), "--classes", "3", "--out",
                       os.path.join(out, "forgot.pt"), "--report-dir", os.path.join(out, "rep"), "--device", "cpu"])
        sys.stdout.flush()
        assert rc == 0 and not torch.distributed.is_initialized()
    except BaseException as exc:
        _record_error(out, rank, exc)
        raise


def _raising_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 raises before its first collective; rank 0 runs unlearn and must fail fast and clearly."""
    try:
        _join_group(rank, port, timeout_s=20)
        if rank == 1:
            raise ValueError("rank 1 failed on purpose")
        train, _, info = data.load_dataset("digits")
        dfmu_ext.unlearn(_model(info), train, CLASSES, 0.2, progress=False)
    except BaseException as exc:
        _record_error(out, rank, exc)
        raise


def _stuck_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 stays alive but never joins a collective; rank 0 must time out after DFMU_DIST_TIMEOUT."""
    try:
        _join_group(rank, port, timeout_s=2)
        if rank == 1:
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(out, "error0.json")) and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        train, _, info = data.load_dataset("digits")
        dfmu_ext.unlearn(_model(info), train, CLASSES, 0.2, progress=False)
    except BaseException as exc:
        _record_error(out, rank, exc)
        raise


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-rank run: score_and_prune on each rank's shard, then a short unlearn under DDP; plus the
    single-process reference on the same batch / data."""
    out = str(tmp_path_factory.mktemp("ddp"))
    torch.set_num_threads(1)
    train, test, info = data.load_dataset("digits")
    torch.manual_seed(0)
    original = _model(info)
    training.train_model(original, train, training.TrainConfig(epochs=4, lr=0.05), progress=False)
    batch = _scoring_batch(train)
    torch.save(original.state_dict(), os.path.join(out, "original.pt"))
    torch.save(batch, os.path.join(out, "batch.pt"))
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "3", "--out",
                     os.path.join(out, "mlp.pt"), "--device", "cpu", "--quiet"]) == 0

    start = time.monotonic()
    codes = _spawn(_pipeline_worker, (_free_port(), _free_port(), out), timeout_s=120)
    seconds = time.monotonic() - start
    errors = [open(os.path.join(out, f"error{r}.json")).read() for r in range(WORLD)
              if os.path.exists(os.path.join(out, f"error{r}.json"))]
    assert codes == [0] * WORLD, f"exit codes {codes}: {errors}"

    single_prune = dfmu_ext.score_and_prune(copy.deepcopy(original), batch, CLASSES)
    single_model = copy.deepcopy(original)
    single = dfmu_ext.unlearn(single_model, train, CLASSES, RETAIN_FRACTION, finetune=FinetuneConfig(**FT), seed=0,
                              progress=False)
    return {
        "prune": [torch.load(os.path.join(out, f"prune{r}.pt"), weights_only=True) for r in range(WORLD)],
        "unlearn": [torch.load(os.path.join(out, f"unlearn{r}.pt"), weights_only=False) for r in range(WORLD)],
        "single_prune": single_prune, "single": single, "single_model": single_model, "info": info,
        "train": train, "test": test, "seconds": seconds, "out": out,
    }


@pytest.mark.slow  # two worker processes (the ddp_run fixture: 29 s, measured)
def test_scores_and_masks_equal_single_process(ddp_run):
    ref = ddp_run["single_prune"]
    for got in ddp_run["prune"]:  # every rank holds the whole batch's scores and the same masks
        assert torch.equal(got["counts"], ref.counts)
        assert got["scores"].keys() == ref.scores.keys()
        for name, s in ref.scores.items():
            torch.testing.assert_close(got["scores"][name], s, rtol=1e-5, atol=1e-6)
        assert got["masks"].keys() == ref.masks.keys()
        for name, m in ref.masks.items():
            assert torch.equal(got["masks"][name], m), name
        assert got["pre_acc"] == ref.pre_prune_retain_accuracy
    assert sum(int((m == 0).sum()) for m in ref.masks.values()) > 0, "nothing was pruned: the test is vacuous"


@pytest.mark.slow  # two worker processes (the ddp_run fixture: 29 s, measured)
def test_unlearn_ddp_keeps_replicas_identical(ddp_run):
    r0, r1 = ddp_run["unlearn"]
    assert r0["identical"] and r1["identical"]
    assert r0["digest"] == r1["digest"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the same stop decision at the same step on both ranks
    for key in ("steps", "samples", "epochs_run", "stopped_early"):
        assert r0["finetune"][key] == r1["finetune"][key], key
    # the masks are those of one process scoring the whole scoring batch
    single = ddp_run["single"]
    for name, m in single.masks.items():
        assert torch.equal(r0["masks"][name], m), name


@pytest.mark.slow  # two worker processes (the ddp_run fixture: 29 s, measured)
def test_unlearn_ddp_matches_single_process_accuracy(ddp_run):
    info = ddp_run["info"]
    model = _model(info)
    model.load_state_dict(ddp_run["unlearn"][0]["state"])
    kw = dict(device="cpu", mia=False, probe=False)
    ddp = dfmu_ext.evaluate(model, ddp_run["train"], ddp_run["test"], CLASSES, **kw)
    one = dfmu_ext.evaluate(ddp_run["single_model"], ddp_run["train"], ddp_run["test"], CLASSES, **kw)
    assert ddp["forget_acc"] <= 0.01 and one["forget_acc"] <= 0.01
    assert ddp["forget_test_acc"] <= 0.03
    assert abs(ddp["retain_acc"] - one["retain_acc"]) <= 0.04, (ddp, one)
    assert abs(ddp["test_acc"] - one["test_acc"]) <= 0.05, (ddp, one)
    assert ddp["retain_acc"] >= 0.85
    # the data are split, not duplicated: together the ranks saw as many samples per step as one process
    single_ft = ddp_run["single"].finetune
    ddp_ft = ddp_run["unlearn"][0]["finetune"]
    assert abs(ddp_ft["samples"] / ddp_ft["steps"] - single_ft["samples"] / single_ft["steps"]) <= 8


@pytest.mark.slow  # two worker processes
def test_failing_rank_surfaces_a_clear_error(tmp_path):
    start = time.monotonic()
    codes = _spawn(_raising_worker, (_free_port(), str(tmp_path)), timeout_s=60)
    assert codes[1] != 0
    assert codes[0] != 0, "rank 0 must not carry on as if nothing happened"
    e1 = json.loads((tmp_path / "error1.json").read_text())
    assert e1["message"] == "rank 1 failed on purpose"
    e0 = json.loads((tmp_path / "error0.json").read_text())
    assert e0["type"] == "DistributedError", e0
    assert "rank 0 of 2 failed during scoring" in e0["message"] and dd.TIMEOUT_ENV in e0["message"]
    assert time.monotonic() - start < 60


@pytest.mark.slow  # two worker processes
def test_stuck_rank_times_out(tmp_path):
    start = time.monotonic()
    codes = _spawn(_stuck_worker, (_free_port(), str(tmp_path)), timeout_s=60)
    assert codes[0] != 0 and codes[1] == 0
    e0 = json.loads((tmp_path / "error0.json").read_text())
    assert e0["type"] == "DistributedError", e0
    assert "time out after 2 s" in e0["message"], e0["message"]
    assert time.monotonic() - start < 60


@pytest.mark.slow  # two worker processes (the ddp_run fixture: 29 s, measured)
def test_cli_under_ddp_rank0_alone_prints_and_writes(ddp_run):
    out = ddp_run["out"]
    printed0 = open(os.path.join(out, "stdout0.txt")).read()
    printed1 = open(os.path.join(out, "stdout1.txt")).read()
    assert printed1 == "", printed1
    assert printed0.count("| DFMU |") == 1 and "x 2 ranks" in printed0, printed0
    report = json.loads(open(os.path.join(out, "rep", "report.json")).read())
    assert report["world_size"] == 2
    assert report["metrics"]["DFMU"]["forget_acc"] <= 0.01
    assert report["metrics"]["DFMU"]["test_acc"] >= report["metrics"]["original"]["test_acc"] - 0.1
    assert torch.load(os.path.join(out, "forgot.pt"), weights_only=True)["meta"]["forgotten_classes"] == [3]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFMU_TEST_TORCHRUN") != "1", reason="real torchrun run: set DFMU_TEST_TORCHRUN=1")
def test_torchrun_cli_forget(tmp_path):
    """`torchrun --nproc_per_node 2 -m dfmu_ext forget` (static rendezvous on 127.0.0.1): rank 0 alone
    prints the table and writes the report and checkpoint."""
    ckpt, out, rep = tmp_path / "orig.pt", tmp_path / "forgot.pt", tmp_path / "rep"
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "3", "--out", str(ckpt),
                     "--device", "cpu", "--quiet"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", dd.TIMEOUT_ENV: "30"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "dfmu_ext", "forget", "--ckpt", str(ckpt),
           "--classes", "3", "--out", str(out), "--report-dir", str(rep), "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| DFMU |") == 1, proc.stdout
    assert "x 2 ranks" in proc.stdout
    report = json.loads((rep / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["metrics"]["DFMU"]["forget_acc"] <= 0.01
    assert report["metrics"]["DFMU"]["test_acc"] >= report["metrics"]["original"]["test_acc"] - 0.1
    assert torch.load(out, weights_only=True)["meta"]["forgotten_classes"] == [3]


# --------------------------------------------------------------------------------------------
# single-process behaviour of the helpers (no process group)
# --------------------------------------------------------------------------------------------

def test_timeout_from_env(monkeypatch):
    monkeypatch.delenv(dd.TIMEOUT_ENV, raising=False)
    assert dd.timeout_from_env().total_seconds() == dd.DEFAULT_TIMEOUT_S == 60
    monkeypatch.setenv(dd.TIMEOUT_ENV, "2.5")
    assert dd.timeout_from_env().total_seconds() == 2.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(dd.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=dd.TIMEOUT_ENV):
            dd.timeout_from_env()


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dd.is_distributed() and dd.get_rank() == 0 and dd.get_world_size() == 1 and dd.is_main_process()
    assert dd.init_from_env("cpu") == (torch.device("cpu"), False)
    x, y = torch.arange(10.0), torch.arange(10)
    comm = dd.current_comm()
    assert type(comm) is dd.Comm and comm.world_size == 1 and comm.is_main
    assert comm.shard((x, y))[0] is x
    t = torch.ones(3)
    comm.broadcast_([t])
    comm.all_reduce_sum_([t])
    assert torch.equal(t, torch.ones(3))
    assert comm.global_fraction(3, 4) == 0.75
    m0 = torch.nn.Linear(2, 2)
    assert comm.wrap(m0) is m0 and comm.sampler(range(4), 0) is None and comm.local_batch_size(7) == 7
    m = torch.nn.Linear(2, 2)
    assert dd.replicas_identical(m) and dd.state_digest(m) == dd.state_digest(copy.deepcopy(m))
    with pytest.raises(RuntimeError, match="gloo"), comm.guard("x"):  # passes errors through untouched
        raise RuntimeError("gloo")


def test_init_from_env_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(dd.DistributedError, match="torchrun"):
        dd.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dd.env_world_size()


def test_cli_only_forget_runs_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="only `forget` runs under torchrun"):
        cli.main(["train", "--dataset", "digits", "--out", str(tmp_path / "x.pt"), "--device", "cpu"])
    assert not torch.distributed.is_initialized()
