"""The build check: C++ argument errors reach Python whole, and a build that cannot do that is named."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import torch

import dfmu_ext
from dfmu_ext import _C, buildcheck

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and dfmu_ext.build_info()["with_cuda"] else [])


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
@pytest.mark.parametrize("library", ["ours", "libc10", "math"])
def test_needed_libraries_agree_with_readelf(library):
    path = {"ours": _C.__file__, "math": math.__file__,
            "libc10": next(p for p in _loaded_libraries() if "libc10.so" in p)}[library]
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert buildcheck.needed_libraries(path) == re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _loaded_libraries():
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if ".so" in line})


def test_this_build_uses_the_shared_cxx_runtime():
    assert buildcheck.CXX_RUNTIME in buildcheck.needed_libraries(_C.__file__)
    assert buildcheck.linkage_problems(_C.__file__) == []


def test_a_library_without_the_shared_cxx_runtime_is_named():
    if not math.__file__.endswith(".so"):
        pytest.skip("math is built into this interpreter")
    problems = buildcheck.linkage_problems(math.__file__)  # a C module: no libstdc++ at all
    assert len(problems) == 1 and "does not load the shared C++ runtime" in problems[0]


def test_import_warns_about_a_static_cxx_runtime():
    from dfmu_ext import _loader

    if not math.__file__.endswith(".so"):
        pytest.skip("math is built into this interpreter")
    with pytest.warns(RuntimeWarning, match="does not load the shared C\\+\\+ runtime"):
        assert _loader.warn_if_static_cxx_runtime(math.__file__)
    assert not _loader.warn_if_static_cxx_runtime(_C.__file__)


def test_not_an_elf_library(tmp_path):
    p = tmp_path / "x.so"
    p.write_text("not a library")
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        buildcheck.needed_libraries(str(p))


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_raises_whole_messages_in_a_child_process(device):
    assert buildcheck.run_error_paths(device) == []


def test_a_cut_message_is_reported(monkeypatch):
    cases = buildcheck.error_path_cases("cpu")
    op, exc, message, call = cases[0]
    monkeypatch.setattr(buildcheck, "error_path_cases", lambda device: [(op, exc, message + " and more", call)])
    problems = buildcheck.run_error_paths("cpu")
    assert len(problems) == 1 and "expected ValueError" in problems[0] and "and more" in problems[0]


def test_a_crash_is_reported_with_the_case_it_died_on(monkeypatch):
    crash = "__import__('os').kill(__import__('os').getpid(), 11)"
    cases = buildcheck.error_path_cases("cpu")[:1] + [("block_importance", "ValueError", "x", crash)]
    monkeypatch.setattr(buildcheck, "error_path_cases", lambda device: cases)
    problems = buildcheck.run_error_paths("cpu")
    assert problems[-1].startswith("cpu: the process died (killed by signal 11) at " + crash)
    assert len(problems) == 1  # the case before the crash passed


def test_check_and_command_line(capsys):
    report = buildcheck.check(["cpu"])
    assert report["ok"] and report["problems"] == [] and report["library"] == _C.__file__
    assert buildcheck.main([]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "C++ runtime shared" in line and line.endswith("OK")
