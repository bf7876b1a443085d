"""Does the compiled library report errors as Python exceptions? Two cheap checks, run after every
build (``make build``) and by the GPU check script:

    python -m dfmu_ext.buildcheck [--json]

1. **Linkage.** The library must use the process's shared C++ runtime: ``libstdc++.so.6`` among
   its ELF ``DT_NEEDED`` entries. A library that carries a static copy of libstdc++ (a compiler
   configured or invoked with ``-static-libstdc++``, a GCC built without shared runtimes) brings a
   second set of iostream locales and facets into a process whose torch uses the shared one. Our
   messages are built in our copy's ``std::ostringstream`` and handed to torch's ``operator<<`` for
   sizes, dtypes and devices (the shared copy): the two copies' facet tables do not agree, so the
   message is cut short at the first torch value (measured here with torch 2.11 and 2.14) or the
   process dies (SIGSEGV, the torch 2.11 GPU machine's symptom; see benchmarks/RESULTS.md).
2. **Error paths.** In a child process (so that a crash is reported, not suffered), every op is
   called through ``torch.ops.dfmu_ext`` with bad arguments on every available device; each call
   must raise the documented exception type with its whole message, byte for byte.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ._linkage import CXX_RUNTIME, linkage_problems, needed_libraries

__all__ = ["needed_libraries", "linkage_problems", "error_path_cases", "run_error_paths", "check", "main"]


def error_path_cases(device: str) -> list[tuple]:
    """``(op, exception type, exact message, call)`` for one device; ``call`` is Python source that
    evaluates the op with bad arguments (``t`` is a helper making float tensors on the device)."""
    bi = "torch.ops.dfmu_ext.block_importance.default"
    masks = "torch.ops.dfmu_ext.apply_channel_masks_.default"
    return [
        ("block_importance", "ValueError",
         "block_importance: act and grad must have the same shape, got [4, 3, 2, 2] and [4, 3, 2, 3]",
         f"{bi}(t(4, 3, 2, 2), t(4, 3, 2, 3), None, 1, 1, 'abs')"),
        ("block_importance", "ValueError",
         "block_importance: group ids must lie in [0, num_groups=2), got ids in [0, 2]",
         f"{bi}(t(4, 3), t(4, 3), torch.tensor([0, 1, 2, 0], device=dev), 2, 1, 'abs')"),
        ("block_importance", "TypeError",
         "block_importance: act and grad must be float16, bfloat16, float32 or float64, got Int",
         f"{bi}(t(4, 3).int(), t(4, 3).int(), None, 1, 1, 'abs')"),
        ("block_importance", "ValueError",
         "block_importance: reduce must be 'abs', 'square' or 'signed', got 'mean'",
         f"{bi}(t(4, 3), t(4, 3), None, 1, 1, 'mean')"),
        ("apply_channel_masks_", "ValueError",
         "apply_channel_masks_: masks[1] has 2 values but tensors[1] has 3 units in dim 0",
         f"{masks}([t(3, 4), t(3, 4)], [t(3), t(2)])"),
        ("apply_channel_masks_", "ValueError",
         "apply_channel_masks_: got 2 tensors but 1 masks",
         f"{masks}([t(3), t(3)], [t(3)])"),
        ("apply_channel_masks_", "TypeError",
         "apply_channel_masks_: masks[0] must be a floating-point tensor, got Long",
         f"{masks}([t(3)], [t(3).long()])"),
        ("apply_channel_masks_", "ValueError",
         "apply_channel_masks_: masks[0] must be 1-D, got shape [3, 1]",
         f"{masks}([t(3)], [t(3, 1)])"),
    ]


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2])  # the same dfmu_ext as the parent's
import torch
import dfmu_ext  # registers the ops
dev = sys.argv[1]
cases = json.loads(sys.stdin.read())
def t(*shape):
    return torch.ones(*shape, device=dev)
out = []
for op, _, _, call in cases:
    try:
        eval(call)
        out.append([op, None, None])
    except Exception as exc:
        out.append([op, type(exc).__name__, str(exc)])
    print(json.dumps(out[-1]), flush=True)  # line by line: a crash still leaves the earlier results
"""


def run_error_paths(device: str, timeout: float = 120.0) -> list[str]:
    """Runs :func:`error_path_cases` on ``device`` in a child process; returns the problems found."""
    cases = error_path_cases(device)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _CHILD, device, package_root], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    problems = []
    for (op, exc_type, message, call), got in zip(cases, results):
        if got[1] != exc_type or got[2] != message:
            raised = "nothing" if got[1] is None else f"{got[1]}: {got[2]!r}"
            problems.append(f"{device}: {call} raised {raised}, expected {exc_type}: {message!r}")
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        nxt = cases[len(results)][3] if len(results) < len(cases) else "(after the last case)"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        problems.append(f"{device}: the process died ({how}) at {nxt} {tail[0]}".rstrip())
    return problems


def check(devices: list[str] | None = None) -> dict:
    """Both checks; ``{"ok", "library", "needed", "build", "problems"}``."""
    import torch

    from . import _C
    from ._loader import build_info

    if devices is None:
        devices = ["cpu"] + (["cuda"] if build_info()["with_cuda"] and torch.cuda.is_available() else [])
    problems = linkage_problems(_C.__file__)
    for device in devices:
        problems += run_error_paths(device)
    return {"ok": not problems, "library": _C.__file__, "needed": needed_libraries(_C.__file__),
            "build": build_info(), "devices": devices, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dfmu_ext.buildcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = p.parse_args(argv)
    report = check()
    if args.json:
        print(json.dumps(report, indent=1))
    b = report["build"]
    print(f"dfmu_ext build check: compiled by {b.get('compiler') or 'an unrecorded compiler'}; torch was built "
          f"with {b.get('torch_compiler') or 'an unknown compiler'}; C++ runtime "
          f"{'shared' if CXX_RUNTIME in report['needed'] else 'NOT shared'}; error paths on "
          f"{', '.join(report['devices'])}: {'OK' if report['ok'] else 'FAILED'}")
    for problem in report["problems"]:
        print(f"  problem: {problem}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
