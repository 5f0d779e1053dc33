"""The documentation site as a reader sees it: built with warnings as errors, served over HTTP
on localhost, and opened in a real headless browser (Chromium), whose rendered DOM must hold the
quickstart's code and the API reference's entries for the learners.

Skipped, with the reason, where MkDocs or Chromium is missing, unless ``METAZOO_REQUIRE_BROWSER=1``
(set by ``.ci/run``, which installs Chromium): then a missing tool fails the test instead.
"""

from __future__ import annotations

import functools
import html
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
REQUIRED = os.environ.get("METAZOO_REQUIRE_BROWSER") == "1"


def _require(condition: bool, reason: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(f"{reason} (METAZOO_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``(URL, folder)`` of the built site, served on localhost for the module's tests."""
    _require(importlib.util.find_spec("mkdocs") is not None,
             "needs mkdocs (requirements-docs.txt, installed by scripts/setup.sh --dev)")
    folder = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(folder)],
        cwd=folder, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "DOCS_EXECUTE": "false"})
    assert built.returncode == 0, built.stderr[-3000:]
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def rendered(url: str, tmp_path: Path) -> str:
    """The DOM of ``url`` after Chromium has loaded it and run its scripts."""
    _require(CHROMIUM is not None, "needs Chromium (.ci/run installs it: apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_quickstart_renders_its_code(site, tmp_path):
    dom = rendered(f"{site[0]}/quickstart/", tmp_path)
    assert "<title>" in dom and "Quickstart" in dom
    text = html.unescape(dom)
    # highlighted code blocks: the learners built the same way, as the page writes them
    assert dom.count('class="highlight"') >= 5
    for name in ("MAML", "Reptile", "WarpGrad"):
        assert name in text
    assert "meta_optimizer" in text and "inner_steps" in text
    assert "docs-test" not in text.replace("<!-- docs-test", "")  # markers stay comments


def test_the_api_reference_renders_the_learners(site, tmp_path):
    learners = {"maml": ("maml.MAML", "maml.Reptile", "maml.iMAML"),
                "leap": ("leap.LeapLearner",),
                "warpgrad": ("warpgrad.WarpGrad", "warpgrad.Warp"),
                "metazoo": ("metazoo.MetaLearner", "metazoo.unroll.unroll", "metazoo.Task")}
    for package, entries in learners.items():
        dom = rendered(f"{site[0]}/api/{package}/", tmp_path)
        for entry in entries:
            assert f'id="{entry}"' in dom, f"{package}: no entry {entry}"
        # the docstrings themselves, not only the headings
        assert 'class="doc doc-contents' in dom


@pytest.mark.parametrize(("package", "page"), [("metazoo", "metazoo"), ("maml", "maml"),
                                              ("leap", "leap"), ("warpgrad", "warpgrad"),
                                              ("metazoo.lightning", "lightning")])
def test_the_api_reference_covers_every_public_name(site, package, page):
    """Every name in the package's ``__all__`` has an entry on its API page (a name that is also
    a submodule, such as ``metazoo.unroll``, under the submodule's path)."""
    if package == "metazoo.lightning":
        _require(importlib.util.find_spec("lightning") is not None,
                 "needs lightning (requirements-dev.txt)")
    module = importlib.import_module(package)
    built = (site[1] / "api" / page / "index.html").read_text()
    missing = [name for name in module.__all__
               if f'id="{package}.{name}"' not in built
               and f'id="{package}.{name}.{name}"' not in built]
    assert not missing, f"docs/api/{page}.md: no API entry for {missing}"
