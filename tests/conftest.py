"""Shared fixtures: a private token cache per session, tiny corpora, offline Hugging Face."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Set before `datasets` / `huggingface_hub` are imported: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="lstm-lm-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_HF_HOME, "datasets"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_TRAIN = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the mat",
    "the bird sang on the log",
] * 30
TINY_VALID = ["the cat sat on the log", "the dog sat on the mat"] * 10
TINY_TEST = ["a bird sat on the mat", "the cat met the dog"] * 10


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own encoded-ids cache, so cache hits are only the test's own."""
    monkeypatch.setenv("LSTM_LM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session", autouse=True)
def _session_working_directory(tmp_path_factory):
    """Module and session fixtures, too, run outside the repository (see below)."""
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
    """Each test runs in a directory of its own: `train` points runs/latest, in the working
    directory, at the run it trained, and no test may write into the repository."""
    monkeypatch.chdir(tmp_path)


def write_tiny_corpus(d: Path) -> Path:
    """Write the tiny corpus into a new directory `d` in the PTB layout: train.txt, valid.txt, test.txt."""
    d.mkdir()
    for name, lines in (("train", TINY_TRAIN), ("valid", TINY_VALID), ("test", TINY_TEST)):
        (d / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path / "tiny")


def tiny_overrides(data: Path) -> list[str]:
    """A model small enough to train in a second or two."""
    return [
        f"data.source={data}",
        "model.embedding_size=16",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.dropout=0.0",
        "train.epochs=2",
        "train.batch_size=4",
        "train.bptt=8",
        "train.eval_batch_size=2",
        "train.optimizer=adamw",
        "train.lr=0.01",
        "train.clip=1.0",
        "train.device=cpu",
    ]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_sets(data: Path, *extra: str) -> list[str]:
    """`tiny_overrides` (and `extra`) as `lstm-lm train` options: --set key=value ..."""
    args = []
    for o in tiny_overrides(data)[1:] + list(extra):
        args += ["--set", o]
    return args


requires_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "ptb" / "train.txt").is_file(), reason="../shared/data is not present"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A directory in which the quickstart's `lstm-lm train` has run once (runs/demo,
    runs/latest): the demo model that the CLI and README tests share (45 s to train)."""
    from typer.testing import CliRunner

    from lstm_lm.cli import app

    work = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(work)
        m.setenv("LSTM_LM_CACHE", str(work / "cache"))
        result = CliRunner().invoke(app, ["train", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return work


def headless_chromium(tmp_path: Path, window: str = "1100,1250"):
    """Debian's Chromium driven by its ChromeDriver, headless, with a profile in `tmp_path`;
    the test skips where either is missing (nothing downloads a browser at run time)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={window}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)
