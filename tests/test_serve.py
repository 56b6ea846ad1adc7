"""`lstm-lm serve`: every endpoint and bad request through FastAPI's TestClient, a real
uvicorn process over HTTP on loopback, and the web page in headless Chromium."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import headless_chromium

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from lstm_lm import LanguageModel, cells  # noqa: E402
from lstm_lm.demo import SEED_ANSWER, SEED_PROMPT  # noqa: E402
from lstm_lm.inference.serve import MAX_BODY_BYTES, create_app  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(demo_workdir) -> Path:
    return demo_workdir / "runs" / "demo"


@pytest.fixture(scope="module")
def client(demo_run):
    return TestClient(create_app(LanguageModel.load(demo_run)))


def test_next_complete_score_trace_model_health(client):
    words = client.post("/v1/next", json={"prompt": SEED_PROMPT, "k": 3}).json()["words"]
    assert words[0]["word"] == SEED_ANSWER and words[0]["p"] > 0.5 and len(words) == 3
    assert client.post("/v1/complete", json={"prompt": SEED_PROMPT}).json() == {"completion": f"{SEED_ANSWER}."}
    sampled = [
        client.post(
            "/v1/complete", json={"prompt": "My name is", "temperature": 1.0, "top_p": 0.9, "seed": 5, "words": 5}
        ).json()
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    results = client.post("/v1/score", json={"texts": [SEED_PROMPT + " Tamil.", ""], "per_token": True}).json()[
        "results"
    ]
    assert results[0]["tokens"] == 15 and results[0]["logprob"] < 0 and results[1]["tokens"] == 1
    assert len(results[0]["token_logprobs"]) == 15
    trace = client.post("/v1/trace", json={"prompt": SEED_PROMPT, "units": 4}).json()
    assert trace["tokens"][-1] == "speak" and set(trace["gates"]) == {"forget", "input", "output"}
    assert len(trace["gates"]["input"]["values"][0]) == 4 and len(trace["norms"]["c"]) == len(trace["tokens"])
    swap = client.post(
        "/v1/trace", json={"prompt": SEED_PROMPT, "swap": {"word": "Tamilnadu", "other": "Kerala"}}
    ).json()
    at = swap["tokens"].index("Tamilnadu")
    assert max(swap["swap"]["distance"][:at]) == 0 and min(swap["swap"]["distance"][at:]) > 1  # written, and kept
    assert swap["swap"]["guesses"][0][0] == "Malayalam"
    model = client.get("/v1/model").json()
    assert model["cell"] == "lstm" and model["corpus"] == "demo" and model["valid_perplexity"] > 1
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/next", "/v1/complete", "/v1/score", "/v1/trace"}
    assert "lstm-lm" in client.get("/").text and client.get("/static/app.js").status_code == 200


BAD_REQUESTS = [
    # (method, path, body, status, part of the error)
    ("post", "/v1/next", b"{not json", 400, "not valid JSON"),
    ("post", "/v1/next", {}, 422, "prompt: required"),
    ("post", "/v1/next", {"prompt": 42}, 422, "prompt: Input should be a valid string"),
    ("post", "/v1/next", {"prompt": "My name", "k": "3"}, 422, "k: Input should be a valid integer"),
    ("post", "/v1/next", {"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ("post", "/v1/next", {"prompt": "   "}, 400, "empty"),
    ("post", "/v1/next", {"prompt": "Zyxwv Qwrtp"}, 400, "vocabulary"),
    ("post", "/v1/next", {"prompt": "a" * 10_001}, 422, "at most 10000 characters"),
    ("post", "/v1/next", {"prompt": "I " * 4500}, 400, "limit is 4096"),
    ("post", "/v1/next", {"prompt": "My name", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("post", "/v1/next", {"prompt": "My name", "k": 101}, 422, "k: Input should be less than or equal to 100"),
    ("post", "/v1/next", {"prompt": "My name", "kk": 3}, 422, "kk: unknown field"),
    ("post", "/v1/next", [SEED_PROMPT], 422, "body: Input should be a valid dictionary"),
    ("post", "/v1/complete", {"prompt": "My name", "words": 0}, 422, "words: Input should be greater"),
    ("post", "/v1/complete", {"prompt": "My name", "words": 201}, 422, "words: Input should be less"),
    ("post", "/v1/complete", {"prompt": "My name", "temperature": -1}, 422, "temperature"),
    ("post", "/v1/complete", {"prompt": "My name", "top_p": 1.5}, 422, "top_p"),
    ("post", "/v1/score", {"texts": []}, 422, "texts: List should have at least 1 item"),
    ("post", "/v1/score", {"texts": "My name"}, 422, "texts: Input should be a valid list"),
    ("post", "/v1/score", {"texts": ["a"] * 1001}, 422, "texts: List should have at most 1000 items"),
    ("post", "/v1/trace", {"prompt": SEED_PROMPT, "swap": {"word": "Paris", "other": "Kerala"}}, 400, "not one of"),
    ("post", "/v1/score", b'{"texts": ["' + b"a" * (MAX_BODY_BYTES + 10) + b'"]}', 413, "over the limit"),
    ("get", "/v1/nothing", None, 404, "Not Found"),
    ("get", "/v1/next", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(
    "method,path,body,status,message", BAD_REQUESTS, ids=[f"{r[1]}-{r[4][:24]}" for r in BAD_REQUESTS]
)
def test_a_bad_request_gets_a_4xx_and_a_json_error(client, method, path, body, status, message):
    if isinstance(body, bytes):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"], r.json()
    assert client.get("/healthz").status_code == 200  # and the server goes on serving
    if status == 405:
        assert r.headers["allow"] == "POST"  # RFC 9110: say which methods are allowed


def test_a_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_many_clients_at_once_get_the_answers_one_client_gets(client):
    prompts = [
        SEED_PROMPT,
        "I am from Kerala and I speak",
        "My name is Maria, I am from France and I speak",
        "I am from Punjab and I speak",
    ]
    want = {p: client.post("/v1/next", json={"prompt": p, "k": 2}).json() for p in prompts}
    got, errors = [], []

    def worker(i):
        try:
            for j in range(10):
                p = prompts[(i + j) % len(prompts)]
                got.append((p, client.post("/v1/next", json={"prompt": p, "k": 2}).json()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 80
    assert all(answer == want[p] for p, answer in got)


@pytest.mark.parametrize("cell", [name for name in cells.names() if name != "lstm"])
def test_every_cell_is_served_with_its_own_gates(tmp_path, cell):
    from lstm_lm.checkpoint import save_checkpoint
    from lstm_lm.config import load_config
    from lstm_lm.data import build_tokenizer
    from lstm_lm.model import LSTMLanguageModel

    cfg = load_config(None, [f"model.cell={cell}", "model.embedding_size=8", "model.hidden_size=8"])
    tokenizer = build_tokenizer(cfg.data, ["the cat sat on the mat", "the dog sat on the log"])
    save_checkpoint(tmp_path / "ckpt", LSTMLanguageModel(cfg.model, tokenizer.get_vocab_size()), tokenizer, cfg)
    client = TestClient(create_app(LanguageModel.load(tmp_path / "ckpt")))
    trace = client.post("/v1/trace", json={"prompt": "the cat sat"}).json()
    spec = cells.get(cell)
    assert set(trace["gates"]) == set(spec.gate_names) and trace["memory"] == spec.memory
    assert len(trace["norms"][spec.memory]) == 3 and trace["title"] == spec.title
    assert ("note" in trace) == (not spec.gate_names) and "no gates" in trace.get("note", "no gates")
    assert len(client.post("/v1/next", json={"prompt": "the cat", "k": 2}).json()["words"]) == 2
    described = client.get("/v1/model").json()
    assert described["cell"] == cell and described["cell_title"] == spec.title


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, demo_run):
    import importlib.util

    from typer.testing import CliRunner

    from lstm_lm.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(demo_run)])
    assert result.exit_code == 1 and "pip install 'lstm-lm[serve]'" in result.stderr


# -- a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_run):
    """`lstm-lm serve --port 0` in its own process; yields its base URL and the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_lm", "serve", "--checkpoint", str(demo_run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
    assert match, line + proc.stderr.read()
    yield match.group(1), proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_a_real_server_answers_over_http(server):
    url, _ = server
    status, body = _post(f"{url}/v1/next", {"prompt": SEED_PROMPT, "k": 1})
    assert status == 200 and body["words"][0]["word"] == SEED_ANSWER
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(f"{url}/v1/next", {"prompt": ""})
    assert e.value.code == 422 and "prompt" in json.loads(e.value.read())["error"]
    with urllib.request.urlopen(f"{url}/", timeout=30) as r:
        assert r.status == 200 and b"suggestions" in r.read()


def _click_token(driver, word: str) -> bool:
    """Click the picture's token `word`; False (so a wait tries again) while it is not drawn."""
    from selenium.webdriver.common.by import By

    tokens = [t for t in driver.find_elements(By.CSS_SELECTOR, "#gates .token") if t.text == word]
    if tokens:
        tokens[0].click()
    return bool(tokens)


def test_the_web_page_suggests_tamil_and_draws_the_gates(server, tmp_path):
    driver = headless_chromium(tmp_path)
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the page redraws the picture while we read it: an element read mid-redraw is stale, so read again
    wait = WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,))
    try:
        driver.get(server[0])
        wait.until(lambda d: "LSTM" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "prompt").send_keys(SEED_PROMPT)
        # the list is redrawn as each key arrives: wait for the last one's, then click its top word
        first = ".suggestion:first-child"
        wait.until(
            lambda d: [e.get_attribute("data-word") for e in d.find_elements(By.CSS_SELECTOR, first)] == [SEED_ANSWER],
            f"the first suggestion never became {SEED_ANSWER!r}",
        )
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, first).click() or True)
        wait.until(lambda d: d.find_element(By.ID, "prompt").get_attribute("value").rstrip().endswith(SEED_ANSWER))
        # the picture: a row per gate, a cell per token and unit, redrawn for the longer sentence
        wait.until(lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "#gates .token")][-1:] == [SEED_ANSWER])
        for gate in ("forget", "input", "output"):
            assert driver.find_elements(By.CSS_SELECTOR, f"#gates g.gate[data-gate={gate}] rect.cell")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gates g.norm rect.bar")) == len(SEED_PROMPT.split()) + 2
        # click "Tamilnadu": the memory of the sentence with another region differs from there on
        wait.until(lambda d: _click_token(d, "Tamilnadu"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gates g.swap rect.bar"))
        assert "written at “Tamilnadu”" in driver.find_element(By.ID, "caption").text
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_sigterm_stops_the_server_cleanly(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped (SIGTERM)" in proc.stderr.read()


def test_ctrl_c_stops_the_server_cleanly(demo_run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_lm", "serve", "--checkpoint", str(demo_run), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "serving" in proc.stderr.readline()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert "stopped (SIGINT)" in proc.stderr.read()
