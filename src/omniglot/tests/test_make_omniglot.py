"""make_omniglot.sh: local archives (checksums, safe extraction), the offline failure message,
the log folder; the extracted data load."""

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import data
import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "make_omniglot.sh"


def run(*args: str, env: dict | None = None, cwd: Path | None = None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGLOT_")}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=120)


@pytest.fixture
def archives(omniglot_root, tmp_path):
    """The synthetic alphabets as two zip archives plus a SHA256SUMS file."""
    folder = tmp_path / "archives"
    folder.mkdir()
    lines = []
    for top in ("images_background_small1", "images_background_small2"):
        path = folder / f"{top}.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in sorted((omniglot_root / top).rglob("*.png")):
                z.write(f, f.relative_to(omniglot_root).as_posix())
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def test_local_source_verifies_extracts_and_makes_logs(archives, tmp_path):
    root, logs = tmp_path / "data", tmp_path / "logs"
    result = run("-dl", "--source", str(archives), "--root", str(root), "--log_dir", str(logs))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("verified") == 2 and logs.is_dir()
    names = [a.name for a in data.find_alphabets(root)]
    assert names == ["Alpha", "Beta", "Delta", "Epsilon", "Gamma", "Shared", "Tiny"]
    # the environment variable works too, and a re-run is idempotent
    again = run("-d", "--root", str(root), env={"OMNIGLOT_SOURCE": str(archives)})
    assert again.returncode == 0, again.stderr


def test_checksum_mismatch_fails(archives, tmp_path):
    sums = archives / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(sums.read_text()[:8], "00000000", 1))
    result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
    assert result.returncode != 0 and "checksum mismatch" in result.stderr


def test_unsafe_archive_entries_are_refused(archives, tmp_path):
    for entry in ("../evil.png", "/abs/evil.png"):
        shutil.rmtree(archives)
        archives.mkdir()
        with zipfile.ZipFile(archives / "bad.zip", "w") as z:
            z.writestr(entry, b"x")
        result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
        assert result.returncode != 0 and "refusing unsafe archive entry" in result.stderr
        assert not (tmp_path / "evil.png").exists()


def test_no_network_and_no_source_fails_fast_saying_how_to_use_local_archives(tmp_path):
    # an unroutable local URL stands in for "no network"
    result = run("-d", "--root", str(tmp_path / "data"),
                 env={"OMNIGLOT_URL": "http://127.0.0.1:9/omniglot"})
    assert result.returncode != 0
    assert "--source ../shared/data/omniglot" in result.stderr
    assert "OMNIGLOT_SOURCE" in result.stderr


def test_bad_flags_show_usage():
    result = run("-x")
    assert result.returncode == 2 and "unknown option -x" in result.stderr
    assert "-p" in result.stdout
    assert run().returncode == 2
