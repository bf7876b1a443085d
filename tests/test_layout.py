"""The package's layers, checked: no module of ``dfmu_ext`` imports a module of a higher layer.

The layers are data in one place, the table under ``<!-- layers -->`` in ``docs/layout.md`` (so the
page cannot drift from what is checked). Every module is read with ``ast`` (nothing is imported):
``import a.b``, ``from a import b`` and relative imports, at any depth (inside functions, ``try`` and
``if TYPE_CHECKING`` blocks too). ``from pkg import name`` counts as an import of the submodule
``pkg.name`` when there is one, else of ``pkg`` itself.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dfmu_ext"
LAYOUT = ROOT / "docs" / "layout.md"
MARKER = "<!-- layers -->"


def layer_table(text: str) -> dict[str, int]:
    """``{name relative to dfmu_ext: layer}`` from the first Markdown table after :data:`MARKER`:
    rows ``| <layer number> | `a`, `b/`, ... | ... |``; a package (``b/`` or a name with modules
    under it) stands for all its modules, ``""`` (written ```dfmu_ext```) for the package root."""
    if MARKER not in text:
        raise AssertionError(f"docs/layout.md has no {MARKER} table")
    table: dict[str, int] = {}
    started = False
    for line in text.split(MARKER, 1)[1].splitlines():
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells[0].isdigit():
            continue  # the header and the |---| line
        for name in re.findall(r"`([^`]+)`", cells[1]):
            key = "" if name == "dfmu_ext" else name.rstrip("/").removesuffix("/*").replace("/", ".")
            if key in table:
                raise AssertionError(f"docs/layout.md gives {name!r} two layers")
            table[key] = int(cells[0])
    if not table:
        raise AssertionError(f"docs/layout.md: the {MARKER} table has no rows")
    return table


def modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _exists(dotted: str) -> bool:
    base = ROOT / Path(*dotted.split("."))  # a module, a package, or the compiled _C*.so
    return base.with_suffix(".py").exists() or base.is_dir() or any(base.parent.glob(base.name + "*.so"))


def imported(module: str, path: Path) -> set[str]:
    """The ``dfmu_ext`` modules that ``module`` (at ``path``) imports, as dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dfmu_ext")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                if len(base) == 0:
                    raise AssertionError(f"{module}: a relative import above the package")
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dfmu_ext":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if alias.name != "*" and _exists(sub) else target)
    found.discard(module)
    return found


def layer_of(dotted: str, table: dict[str, int]) -> tuple[str, int] | None:
    """The longest table entry that is ``dotted`` or a package above it, and its layer (the root
    entry ``""`` places the package's ``__init__`` only, not every module under it)."""
    rel = dotted.removeprefix("dfmu_ext").lstrip(".")
    parts = rel.split(".") if rel else []
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in table:
            return key, table[key]
    return ("", table[""]) if not parts and "" in table else None


def violations(table: dict[str, int]) -> tuple[list[str], list[str]]:
    """(imports of a higher layer, modules the table does not place)."""
    bad, unplaced = [], []
    for module, path in modules().items():
        own = layer_of(module, table)
        if own is None:
            unplaced.append(module)
            continue
        for target in sorted(imported(module, path)):
            other = layer_of(target, table)
            if other is None:
                unplaced.append(f"{target} (imported by {module})")
            elif other[1] > own[1]:
                bad.append(f"{module} imports {target} (layer {own[1]} -> higher layer {other[1]})")
    return bad, sorted(set(unplaced))


def test_the_layer_table_parses_and_places_the_known_floors():
    table = layer_table(LAYOUT.read_text())
    assert table["ops"] < table["importance"] < table["unlearn"] < table["eval"] < table["baselines"] \
        < table["zoo"] < table["experiments"] < table["cli"]
    assert table["lm"] == table["finetune"] and table["__main__"] == table["cli"]


def test_every_module_has_a_layer():
    _, unplaced = violations(layer_table(LAYOUT.read_text()))
    assert not unplaced, "modules docs/layout.md's layer table does not place:\n" + "\n".join(unplaced)


def test_no_module_imports_a_higher_layer():
    bad, _ = violations(layer_table(LAYOUT.read_text()))
    assert not bad, f"{len(bad)} imports of a higher layer:\n" + "\n".join(bad)


# --- the checker itself, on a made-up table and made-up sources ------------------------------------

def test_the_table_reader(tmp_path):
    text = f"intro\n{MARKER}\n| layer | modules |\n|---|---|\n| 0 | `ops`, `_C` |\n| 3 | `eval/`, `cli/*` |\n\nmore | text\n"
    assert layer_table(text) == {"ops": 0, "_C": 0, "eval": 3, "cli": 3}
    with pytest.raises(AssertionError, match="two layers"):
        layer_table(f"{MARKER}\n| 0 | `ops` |\n| 1 | `ops` |\n")
    with pytest.raises(AssertionError, match="no <!-- layers --> table"):
        layer_table("| 0 | `ops` |\n")


def test_imports_are_resolved_relative_absolute_and_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "dfmu_ext"
    (pkg / "eval").mkdir(parents=True)
    for f in ("__init__.py", "ops.py", "unlearn.py", "eval/__init__.py", "eval/metrics.py"):
        (pkg / f).write_text("")
    (pkg / "eval" / "metrics.py").write_text(
        "import torch\nfrom .. import ops\nfrom ..unlearn import unlearn\nimport dfmu_ext.eval\n"
        "def f():\n    from dfmu_ext import build_info\n    from . import predict_nothing\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = imported("dfmu_ext.eval.metrics", pkg / "eval" / "metrics.py")
    # `from . import predict_nothing`: no such submodule, so it is the package dfmu_ext.eval
    assert got == {"dfmu_ext.ops", "dfmu_ext.unlearn", "dfmu_ext.eval", "dfmu_ext"}
    table = {"ops": 0, "unlearn": 3, "eval": 4, "": 9}
    assert layer_of("dfmu_ext.eval.metrics", table) == ("eval", 4)
    assert layer_of("dfmu_ext", table) == ("", 9)
    assert layer_of("dfmu_ext.ops", table) == ("ops", 0)
    assert layer_of("dfmu_ext.nothing", table) is None
