"""Puts src/omniglot on sys.path (an experiment folder, not a package) and builds synthetic
alphabets: PNG drawings in the official archives' layout, in a temporary folder."""

import filecmp
import sys
from pathlib import Path

_FOLDER = str(Path(__file__).resolve().parents[1])
if _FOLDER not in sys.path:
    sys.path.insert(0, _FOLDER)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Small models on a shared CPU: one thread is faster than several.
torch.set_num_threads(1)

# (archive, alphabet, characters): "Shared" is in both archives, like Greek and Latin in the
# small archives; "Tiny" has too few characters for 3-way tasks.
LAYOUT = [("images_background_small1", "Alpha", 4), ("images_background_small1", "Beta", 3),
          ("images_background_small1", "Shared", 5), ("images_background_small2", "Shared", 5),
          ("images_background_small2", "Gamma", 3), ("images_background_small2", "Delta", 4),
          ("images_background_small2", "Epsilon", 3), ("images_background_small2", "Tiny", 2)]
DRAWINGS = 5


def write_alphabets(root: Path) -> Path:
    """Writes the synthetic alphabets under ``root``: each character is a bar at its own
    angle, each drawing a jittered copy (105x105, mode '1', black ink on white)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:105, :105] - 52.0
    for archive, alphabet, chars in LAYOUT:
        for c in range(chars):
            folder = root / archive / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = np.pi * (c / chars + 0.3 * (sum(map(ord, alphabet)) % 7) / 7)
            for d in range(DRAWINGS):
                a = angle + rng.normal(0, 0.05)
                dist = np.abs(np.cos(a) * yy - np.sin(a) * xx)
                ink = (dist < 6) & (np.hypot(yy, xx) < 40 + rng.integers(0, 8))
                img = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("1")
                img.save(folder / f"0{c:03d}_{d + 1:02d}.png")
    return root


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of synthetic alphabets (6 distinct with >= 3 characters, one in both archives,
    one with 2 characters)."""
    return write_alphabets(tmp_path_factory.mktemp("omniglot"))


def tiny_args(root: Path, log_dir: Path | None, method: str | None, *extra: str) -> list[str]:
    """main.py flags for a 2-meta-step run on the synthetic alphabets: 3 train, 1 val and 2
    test alphabets, 3-way tasks (``log_dir``/``method`` None: left to run_multi)."""
    own = [] if log_dir is None else ["--log_dir", str(log_dir)]
    if method is not None:
        own += ["--meta_model", method, "--num_pretrain", "3"]
    return ["--root", str(root), *own, "--num_val", "1", "--num_test", "2", "--classes", "3",
            "--train_images", "3", "--meta_batch_size", "2", "--task_batch_size", "6",
            "--meta_train_steps", "2", "--task_train_steps", "2", "--task_val_steps", "2",
            "--test_ival", "1", "--num_filters", "4", "--log_ival", "0", "--no_cuda",
            "--inner_kwargs", "lr", "0.1", *extra]


@pytest.fixture(scope="session")
def tiny():
    """``tiny_args``: flags for a tiny run (test modules cannot import each other here)."""
    return tiny_args


def assert_same_log_files(a: Path, b: Path, minimum: int) -> None:
    """Runs ``a`` and ``b`` wrote the same ``results_*.log`` files (at least ``minimum``),
    byte for byte."""
    names = sorted(p.name for p in a.glob("results_*.log"))
    assert names == sorted(p.name for p in b.glob("results_*.log")) and len(names) >= minimum
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="session")
def same_log_files():
    """``assert_same_log_files`` (test modules cannot import each other here)."""
    return assert_same_log_files


def fewshot_args(root: Path, log_dir: Path, method: str, *extra: str, steps: int = 2,
                 test_ival: int = 1) -> list[str]:
    """main.py flags for a ``steps``-meta-step few-shot run on the synthetic alphabets: seed 2
    puts Gamma, Shared, Alpha (12 characters) in training, Beta (3) in validation, Delta,
    Epsilon (7) in test; 3-way 1-shot episodes."""
    return ["--protocol", "fewshot", "--root", str(root), "--log_dir", str(log_dir),
            "--meta_model", method, "--seed", "2", "--num_pretrain", "3", "--num_val", "1",
            "--num_test", "2", "--ways", "3", "--shots", "1", "--queries", "2",
            "--meta_batch_size", "2", "--meta_train_steps", str(steps), "--task_train_steps",
            "1", "--task_val_steps", "2", "--test_episodes", "12", "--val_episodes", "4",
            "--test_ival", str(test_ival), "--num_filters", "4", "--log_ival", "0",
            "--no_cuda", "--inner_kwargs", "lr", "0.1", *extra]


@pytest.fixture(scope="session")
def fewshot():
    """``fewshot_args``: flags for a tiny few-shot run."""
    return fewshot_args


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names relative to it) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def snapshot():
    """``folder_snapshot``: a run folder's files and bytes, to show that nothing changed."""
    return folder_snapshot


@pytest.fixture
def one_line_exit_2(capsys):
    """Runs main.py's command in process; asserts one ``error:`` line and exit code 2; returns
    the line."""
    import main
    from metazoo.cli import run_command

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_command(main.main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    return run
