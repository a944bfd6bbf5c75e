"""Executable documentation: the README's Python blocks run, and every public name is documented."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import tidings

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples() -> None:
    assert len(python_blocks()) >= 2


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    # Blocks build on each other, as a reader would paste them into one file.
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(python_blocks()))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_public_name_is_documented() -> None:
    undocumented = []
    for name in tidings.__all__:
        value = getattr(tidings, name)
        if name.startswith("__") or isinstance(value, str | int | float):
            continue
        doc = inspect.getdoc(value)
        if not doc:
            undocumented.append(name)
    assert undocumented == []
