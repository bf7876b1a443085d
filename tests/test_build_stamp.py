"""scripts/build-if-changed.sh (the Makefile's `build` target): compile only when csrc/**, setup.py,
CMakeLists.txt, torch or a build switch changed. Run in a scratch tree with a fake pip."""
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the build script in a bash subprocess

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "build-if-changed.sh")


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "ops.cpp").write_text("// ops\n")
    (tmp_path / "csrc" / "cpu" / "k.cpp").write_text("// kernel\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    (tmp_path / "CMakeLists.txt").write_text("# cmake\n")
    (tmp_path / "dfmu_ext").mkdir()
    (tmp_path / "dfmu_ext" / "__init__.py").write_text("")  # what `import dfmu_ext` must find
    fake_pip = tmp_path / "fake-pip"  # records each install and leaves what a real build leaves
    fake_pip.write_text("#!/bin/sh\necho install >> builds.log\ntouch dfmu_ext/_C.fake.so dfmu_ext/_build_config.py\n")
    fake_pip.chmod(0o755)
    _fake_torch(tmp_path / "torch-a", "2.99.0")  # importing the real torch 14 times would take a minute
    return tmp_path


def _fake_torch(root, version):
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\nclass version:\n    cuda = None\n")
    return root


def _build(tree, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "DFMU_FORCE_CPU", "TORCH_CUDA_ARCH_LIST",
                                                         "FORCE_REBUILD")}
    e.update(PYTHON=sys.executable, PIP=str(tree / "fake-pip"), PYTHONPATH=f"{tree}{os.pathsep}{tree / 'torch-a'}",
             BUILDCHECK="true")
    e.update(env)
    out = subprocess.run(["bash", SCRIPT], cwd=tree, env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return _builds(tree)


def _builds(tree):
    log = tree / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils")
def test_rebuilds_only_when_an_input_changes(tree):
    assert _build(tree) == 1                      # fresh tree: no stamp -> build
    assert (tree / "build" / ".dfmu-build-stamp").is_file()
    assert _build(tree) == 1                      # nothing changed -> no build
    (tree / "csrc" / "cpu" / "k.cpp").write_text("// kernel v2\n")
    assert _build(tree) == 2                      # a source changed
    assert _build(tree) == 2
    (tree / "csrc" / "cuda").mkdir()
    (tree / "csrc" / "cuda" / "new.cu").write_text("// new\n")
    assert _build(tree) == 3                      # a new source
    (tree / "setup.py").write_text("# setup v2\n")
    assert _build(tree) == 4
    (tree / "CMakeLists.txt").write_text("# cmake v2\n")
    assert _build(tree) == 5
    assert _build(tree, DFMU_FORCE_CPU="1") == 6  # a build switch
    assert _build(tree, DFMU_FORCE_CPU="1") == 6
    (tree / "README.md").write_text("docs\n")      # not a build input
    (tree / "dfmu_ext" / "cli.py").write_text("# python: editable install, no rebuild\n")
    assert _build(tree, DFMU_FORCE_CPU="1") == 6
    (tree / "dfmu_ext" / "_C.fake.so").unlink()    # the library vanished -> build
    assert _build(tree, DFMU_FORCE_CPU="1") == 7
    shutil.rmtree(tree / "build")                  # `make clean`
    assert _build(tree, DFMU_FORCE_CPU="1") == 8
    assert _build(tree, DFMU_FORCE_CPU="1", FORCE_REBUILD="1") == 9


def test_a_build_that_fails_the_build_check_is_refused_and_retried(tree):
    e = {k: v for k, v in os.environ.items() if k != "FORCE_REBUILD"}
    e.update(PYTHON=sys.executable, PIP=str(tree / "fake-pip"), PYTHONPATH=f"{tree}{os.pathsep}{tree / 'torch-a'}",
             BUILDCHECK="false")
    out = subprocess.run(["bash", SCRIPT], cwd=tree, env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "the build is unusable" in out.stderr
    assert not (tree / "build" / ".dfmu-build-stamp").exists()  # no stamp: the next call builds again
    assert _builds(tree) == 1
    assert _build(tree) == 2 and (tree / "build" / ".dfmu-build-stamp").is_file()


def test_an_install_that_points_elsewhere_is_rebuilt(tree):
    assert _build(tree) == 1
    assert _build(tree) == 1
    # `import dfmu_ext` would find another checkout (the tree is not on the path): not installed here
    assert _build(tree, PYTHONPATH=str(tree / "torch-a")) == 2
    assert _build(tree) == 2


def test_torch_version_is_part_of_the_key(tree):
    assert _build(tree) == 1
    stamp = (tree / "build" / ".dfmu-build-stamp").read_text()
    assert _build(tree) == 1
    # the same tree under another torch (simulated: a torch module that reports another version)
    assert _build(tree, PYTHONPATH=str(_fake_torch(tree / "torch-b", "3.0.0"))) == 2
    assert (tree / "build" / ".dfmu-build-stamp").read_text() != stamp
