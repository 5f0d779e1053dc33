"""make_omniglot.sh: local archives (checksums, safe extraction), the offline failure message,
the log folder; the extracted data load; the one-shot benchmark's all_runs.zip (local source,
download, absent, unsafe, checksum)."""

import functools
import hashlib
import os
import shutil
import subprocess
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import data
import oneshot

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
        # not the pinned names: these are synthetic stand-ins, verified by SHA256SUMS
        path = folder / f"synthetic_{top[-6:]}.zip"
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


# -- Lake et al.'s one-shot benchmark (all_runs.zip) --------------------------------------------

def write_runs_zip(path: Path, omniglot_root: Path, *, entries: dict[str, bytes] | None = None
                   ) -> Path:
    """A small all_runs.zip in the official layout (all_runs/run01..run02, 2 classes each,
    class_labels.txt mapping test item k to class 3 - k), from the synthetic drawings."""
    pngs = sorted(omniglot_root.rglob("*.png"))
    with zipfile.ZipFile(path, "w") as z:
        for r in (1, 2):
            lines = []
            for c in (1, 2):
                z.write(pngs[8 * r + c], f"all_runs/run0{r}/training/class0{c}.png")
                z.write(pngs[8 * r + 4 + c], f"all_runs/run0{r}/test/item0{c}.png")
                lines.append(f"run0{r}/test/item0{c}.png run0{r}/training/class0{3 - c}.png")
            z.writestr(f"all_runs/run0{r}/class_labels.txt", "\n".join(lines) + "\n")
        for name, content in (entries or {}).items():
            z.writestr(name, content)
    return path


def add_sum(folder: Path, path: Path, digest: str | None = None) -> None:
    with open(folder / "SHA256SUMS", "a") as f:
        f.write(f"{digest or hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


def test_oneshot_runs_from_source_are_extracted_beside_root(archives, omniglot_root, tmp_path):
    add_sum(archives, write_runs_zip(archives / "all_runs.zip", omniglot_root))
    root = tmp_path / "data"
    result = run("-d", "--source", str(archives), "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "verified all_runs.zip" in result.stdout and result.stdout.count("verified") == 3
    runs = oneshot.load_runs(tmp_path / "data_oneshot")
    assert [r.name for r in runs] == ["run01", "run02"]
    assert [r.test_labels.tolist() for r in runs] == [[1, 0], [1, 0]]
    # not among the alphabets main.py reads, not extracted as alphabets
    names = [a.name for a in data.find_alphabets(root)]
    assert names == ["Alpha", "Beta", "Delta", "Epsilon", "Gamma", "Shared", "Tiny"]
    assert not (root / "omniglot" / "all_runs").exists()
    # a zip that is not listed in SHA256SUMS is used with a warning
    (archives / "SHA256SUMS").write_text("".join(
        ln + "\n" for ln in (archives / "SHA256SUMS").read_text().splitlines()
        if "all_runs" not in ln))
    again = run("-d", "--source", str(archives), "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "no checksum known for all_runs.zip" in again.stderr


def test_absent_oneshot_zip_is_a_note_not_a_failure(archives, tmp_path):
    result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "one-shot benchmark data (all_runs.zip, Lake et al. 2015) was NOT installed" \
        in result.stderr
    assert f"no all_runs.zip in {archives}" in result.stderr
    assert "one-shot-classification/all_runs.zip" in result.stderr
    assert not (tmp_path / "data_oneshot").exists()
    assert len(data.find_alphabets(tmp_path / "data")) == 7


@pytest.mark.parametrize("entry", ["../evil.png", "/abs/evil.png"])
def test_unsafe_oneshot_entries_are_refused(archives, omniglot_root, tmp_path, entry):
    write_runs_zip(archives / "all_runs.zip", omniglot_root, entries={entry: b"x"})
    result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
    assert result.returncode != 0 and "refusing unsafe archive entry" in result.stderr
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "data_oneshot").exists()


def test_oneshot_checksum_mismatch_fails(archives, omniglot_root, tmp_path):
    add_sum(archives, write_runs_zip(archives / "all_runs.zip", omniglot_root), "0" * 64)
    result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
    assert result.returncode != 0
    assert "checksum mismatch for" in result.stderr and "all_runs.zip" in result.stderr
    assert not (tmp_path / "data_oneshot").exists()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server standing in for the dataset repository's python/ folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_download_fetches_the_oneshot_runs_and_survives_their_absence(archives, omniglot_root,
                                                                       server, tmp_path):
    folder, url = server
    shutil.copy(archives / "synthetic_small1.zip", folder / "images_background.zip")
    shutil.copy(archives / "synthetic_small2.zip", folder / "images_evaluation.zip")
    # Without all_runs.zip on the server: alphabets installed, a note, success.
    root = tmp_path / "data"
    result = run("-d", "--root", str(root), env={"OMNIGLOT_URL": url})
    assert result.returncode == 0, result.stderr
    assert f"cannot download {url}/one-shot-classification/all_runs.zip" in result.stderr
    assert len(data.find_alphabets(root)) == 7
    # With it: downloaded into data_oneshot/, checked against a SHA256SUMS there, extracted.
    (folder / "one-shot-classification").mkdir()
    zipped = write_runs_zip(folder / "one-shot-classification/all_runs.zip", omniglot_root)
    (tmp_path / "data_oneshot").mkdir()
    add_sum(tmp_path / "data_oneshot", zipped)
    result = run("-d", "--root", str(root), env={"OMNIGLOT_URL": url})
    assert result.returncode == 0, result.stderr
    assert "verified all_runs.zip" in result.stdout
    assert len(oneshot.load_runs(tmp_path / "data_oneshot")) == 2


def test_a_sha256sums_file_does_not_override_a_pinned_checksum(archives, tmp_path):
    """Bug 4: a fake archive under a pinned name, with a SHA256SUMS entry that matches it, was
    reported verified and extracted."""
    fake = archives / "images_background_small1.zip"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("images_background_small1/Fake/character01/0001_01.png", b"not a png")
    add_sum(archives, fake)
    root = tmp_path / "data"
    result = run("-d", "--source", str(archives), "--root", str(root))
    assert result.returncode == 2
    assert f"checksum mismatch for {fake}" in result.stderr and "pinned" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not list(root.rglob("*.png"))  # nothing extracted, not even the good archives


def _bad_zip(path: Path, kind: str) -> None:
    import stat

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/Alpha/character01/a.png", b"png")
        if kind == "link":
            info = zipfile.ZipInfo("ok/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc")
            z.writestr("ok/link/passwd", b"x")
        elif kind == "under_file":
            z.writestr("ok/file", b"x")
            z.writestr("ok/file/b.png", b"x")
        elif kind == "big":
            z.writestr("ok/big.bin", b"\0" * (3 * 2**20))
    if kind == "corrupt":  # flip bytes in the stored data: a CRC error
        data = bytearray(path.read_bytes())
        data[40:43] = b"XYZ"
        path.write_bytes(bytes(data))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize("kind,message", [
    ("corrupt", "is corrupt"), ("truncated", "is not a readable zip archive"),
    ("link", "refusing link entry 'ok/link'"), ("under_file", "lies under a file entry"),
    ("big", "more than the limit of 2 MB"),
])
def test_a_bad_archive_is_one_line_and_nothing_is_extracted(archives, tmp_path, kind, message):
    """Every archive is checked before any is extracted: the bad one sorts last ("zz"), after
    two good ones."""
    _bad_zip(archives / "zz_bad.zip", kind)
    add_sum(archives, archives / "zz_bad.zip")
    root = tmp_path / "data"
    result = run("-d", "--source", str(archives), "--root", str(root),
                 env={"OMNIGLOT_MAX_EXTRACT_MB": "2"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(root.rglob("*.png")) and not (tmp_path / "etc").exists()


def test_the_missing_benchmark_note_is_one_line(archives, tmp_path):
    result = run("-d", "--source", str(archives), "--root", str(tmp_path / "data"))
    assert result.returncode == 0
    notes = [line for line in result.stderr.splitlines() if "NOT installed" in line]
    assert len(notes) == 1 and result.stderr.count("\n") == 1
