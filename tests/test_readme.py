"""Every ```python block of the README runs as written (in a scratch folder, in a fresh process)."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_a_python_example():
    assert python_blocks(), "the README's Python API block is gone"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = python_blocks()[index]
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "DFMU_CACHE": str(tmp_path / "cache"),
           # the dfmu_ext of this tree, as `python -m pytest` from the root imports it
           "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"README python block {index} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"
