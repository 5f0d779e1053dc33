"""The READMEs are short entry points into the documentation site: the top README at most 150
lines with the two commands (set up + run, set up + test) as CI runs them, each package or
experiment README at most 120 lines, and every relative link of a README (into ``docs/`` or
elsewhere in the repository) names a file that exists, with its anchor where it names one.

The site's own links and anchors are checked by ``mkdocs build --strict``
(``tests/test_docs_site.py``); the READMEs are outside the site, so they are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PACKAGE_READMES = sorted([*(ROOT / "src").glob("*/README.md"), ROOT / "benchmarks" / "README.md"])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The heading anchors MkDocs gives a page (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(re.sub(r"\s+", "-", title.strip()))
    return anchors


def test_top_readme_is_short_and_holds_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = ("python3 -m venv .venv && . .venv/bin/activate && ./scripts/setup.sh --dev && "
                    "python -m ruff check . && python -m mypy src/metazoo/metazoo src/maml/maml "
                    "src/leap/leap src/warpgrad/warpgrad && python -m pytest -q")
    assert test_command in text
    # .ci/run runs the same steps
    for step in ("./scripts/setup.sh --dev", "python -m ruff check .", "python -m mypy "
                 "src/metazoo/metazoo src/maml/maml src/leap/leap src/warpgrad/warpgrad",
                 "python -m pytest -q"):
        assert step in ci, step
    assert "./scripts/setup.sh && bash make_omniglot.sh -dl" in text  # set up + run


@pytest.mark.parametrize("readme", PACKAGE_READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_readme_is_a_short_entry_point(readme):
    text = readme.read_text()
    assert len(text.splitlines()) <= 120
    assert "docs/" in text, "a package README links into the documentation site"


@pytest.mark.parametrize("readme", [README, *PACKAGE_READMES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_links_resolve(readme):
    for target in LINK.findall(readme.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (readme.parent / path).resolve() if path else readme
        assert resolved.exists(), f"{readme.relative_to(ROOT)}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{readme.relative_to(ROOT)}: no #{anchor}"
