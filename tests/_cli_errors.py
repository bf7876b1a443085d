"""The CLI tests' check of a usage error: exit status 2, one ``error: ...`` line on stderr, and nothing
written under the folder the call could write to."""
from __future__ import annotations

import pytest

from dfmu_ext import cli


def files_under(root) -> list[str]:
    """Every path below ``root`` (a ``pathlib.Path``), relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_one_line_error(capsys, argv, root, match: str) -> str:
    """Run ``dfmu argv``; assert the usage error above, with ``match`` in its line; return the line."""
    before = files_under(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert files_under(root) == before, "an error must leave nothing written"
    return lines[0]
