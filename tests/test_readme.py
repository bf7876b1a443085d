"""Every ```python block of the README and of docs/*.md runs as written (in a scratch folder, in a fresh
process); a block that imports a package which is not installed (e.g. torchvision) is skipped."""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each block runs in a fresh process (100 s for the file, measured)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(path: str = README) -> list[str]:
    text = open(path, encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def all_blocks() -> list[tuple[str, int, str]]:
    """(file relative to the root, index within the file, code) for README.md, then docs/*.md."""
    return [(os.path.relpath(path, ROOT), i, code)
            for path in [README] + DOCS for i, code in enumerate(python_blocks(path))]


def missing_imports(code: str) -> list[str]:
    """Top-level packages a block imports that cannot be found here."""
    names = re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", code, flags=re.M)
    return sorted({n for n in names if importlib.util.find_spec(n) is None})


def test_readme_has_a_python_example():
    assert python_blocks(), "the README's Python API block is gone"


@pytest.mark.parametrize("where,index,code", all_blocks(), ids=[f"{f}:{i}" for f, i, _ in all_blocks()])
def test_readme_python_block_runs(where, index, code, tmp_path):
    missing = missing_imports(code)
    if missing:
        pytest.skip(f"{where} python block {index} needs {', '.join(missing)}, not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "DFMU_CACHE": str(tmp_path / "cache"),
           # the dfmu_ext of this tree, as `python -m pytest` from the root imports it
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{where} python block {index} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"
