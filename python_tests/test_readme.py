"""Every ```python block of README.md runs, as light-curve tests its README. A block preceded by
``<!-- readme-test: skip (why) -->`` is reported as skipped with that reason (blocks that need
the user's files, optional engines or long runs)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]*)\) -->\n)?"
                   r"```python\n(?P<code>.*?)```", re.S)


def readme_blocks():
    text = README.read_text()
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        yield pytest.param(match.group("code"), match.group("why"), id=f"line{line}")


def test_readme_has_python_blocks_that_run():
    runnable = [p for p in readme_blocks() if p.values[1] is None]
    assert runnable, "README.md has no runnable python block"


@pytest.mark.parametrize("code, why", list(readme_blocks()))
def test_readme_block(code, why, tmp_path, monkeypatch):
    if why is not None:
        pytest.skip(f"README block: {why}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
