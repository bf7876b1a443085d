"""benchmarks/keep_suite_classes.py's frontier plot: drawn whole from a results file's shape, refused
in one line when the results hold no whole-class setup."""
import os

import pytest

from _benchmarks import load_benchmark


def _module():
    return load_benchmark("keep_suite_classes")


def _run(shift: float) -> dict:
    row = lambda d: {"forget": 0.0, "ta": 0.80 + d, "ra": 0.95 + d, "probe": 0.70 + d, "seconds": 1.0}  # noqa: E731
    return {"Original": row(0.03), "Retrain": row(0.0), "head-mask": {**row(shift), "warned": False},
            "DFMU, defaults": {**row(-shift), "warned": True}}


def test_frontier_writes_a_png(tmp_path):
    mod = _module()
    results = {"digits-class-mlp/seed0": _run(0.01), "digits-class-mlp/seed1": _run(0.02),
               "fmnist-class-vit/seed0": _run(0.0), "lm-gpt2-30/seed0": {"not": "a class setup"}}
    path = str(tmp_path / "frontier.png")
    assert mod.frontier(results, path) == path
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["frontier.png"]       # written atomically: no temp left beside it


def test_frontier_needs_a_class_setup(tmp_path):
    with pytest.raises(ValueError, match="no run of a whole-class setup"):
        _module().frontier({"lm-gpt2-30/seed0": {}}, str(tmp_path / "f.png"))
    assert not os.listdir(tmp_path)
