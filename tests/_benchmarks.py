"""Load a script of ``benchmarks/`` (not a package) as a module, for the tests of its functions."""
import importlib.util
import os


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported under ``name``."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
