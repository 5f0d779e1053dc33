"""Every ```python block of the documentation pages and the READMEs runs as written, on the CPU,
and prints what it produced.

A small collector of our own (about 80 lines) rather than pytest-markdown-docs or mktestdocs:
neither is needed elsewhere, and this one adds what they lack here: a block that prints nothing
fails (every example shows its result), a block can skip with a visible reason, and a block can
continue its page's previous one. Markers are HTML comments (invisible on the rendered page) on
the lines right above the fence:

- ``<!-- docs-test: skip REASON -->``: reported as skipped, with REASON;
- ``<!-- docs-test: continue -->``: runs in the namespace the previous ```python block of the
  same page left (a page-scoped namespace). The tests run in page order, so that namespace is
  usually still there; where it is not (the previous block was deselected or failed), the test
  first runs the chain of blocks back to the last one without the marker, quietly. A skipped
  block is left out of the chains that pass through it.

Every other block runs in a fresh namespace, from a temporary working directory. Commands and
long runs are written as ```bash or ```text blocks, which are not run here (the shell commands
of the pages are checked by ``src/omniglot/tests/test_readme.py``).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" /
                "README.md", *(ROOT / "src").glob("*/README.md")])
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|continue)\b\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, or None
    continues: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks with their markers, in order."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        skip, continues, j = None, False, i - 1
        while j >= 0 and (found := MARKER.search(lines[j])):
            if found.group(1) == "skip":
                skip = found.group(2) or "marked skip"
            else:
                continues = True
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
        blocks.append(Block(page, i + 1, "\n".join(lines[i + 1:end]) + "\n", skip, continues))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def chain(block: Block) -> list[Block]:
    """The blocks to run, in order, for ``block``: its page's blocks back to the one it continues
    from without a marker (itself when it does not continue), skipped ones left out."""
    page = [b for b in BLOCKS if b.page == block.page]
    start = page.index(block)
    while page[start].continues:
        if start == 0:
            raise AssertionError(f"{block.name}: 'continue' on the page's first python block")
        start -= 1
    return [b for b in page[start:page.index(block)] if not b.skip] + [block]


# The namespace each block left when it ran and passed (for the blocks that continue it).
_NAMESPACES: dict[Block, dict] = {}


def test_the_collector_finds_the_pages_examples():
    names = {b.name.split(":")[0] for b in BLOCKS}
    assert {"README.md", "docs/quickstart.md", "docs/own-loop.md",
            "docs/algorithms/warpgrad.md"} <= names
    # a marker only applies to the fence right below it
    assert any(b.continues for b in BLOCKS) and any(not b.continues for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_python_block_runs_and_prints(block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.name}: {block.skip}")
    monkeypatch.chdir(tmp_path)
    blocks = chain(block)
    namespace: dict = {"__name__": "__main__"}
    if len(blocks) > 1 and blocks[-2] in _NAMESPACES:
        namespace = _NAMESPACES.pop(blocks[-2])
    else:
        for earlier in blocks[:-1]:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(earlier.code, earlier.name, "exec"), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, block.name, "exec"), namespace)
    assert printed.getvalue().strip(), (
        f"{block.name} printed nothing: an example shows what it produced (a loss before and "
        f"after, an accuracy)")
    if any(b.continues and chain(b)[-2:-1] == [block] for b in BLOCKS if b.page == block.page):
        _NAMESPACES[block] = namespace
