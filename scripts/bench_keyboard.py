"""A keyboard's predictor against the n-gram peer: lstm-lm's model and Debian's presage,
on the same test text, with the same number of suggestions, by the same definition.

    .venv/bin/python scripts/bench_keyboard.py --checkpoint runs/keyboard --data ../shared/data/ptb
    .venv/bin/python scripts/bench_keyboard.py --checkpoint runs/keyboard --lines 300 --browser --json out.json

What it measures (docs/keyboard.md has the definitions):
- lstm-lm: the keystroke simulation of `lstm-lm eval --keystrokes` (inference/keystrokes.py)
  on the first --lines lines of the test split, and on the whole split; the latency of a
  suggestion at batch 1 on one thread (PyTorch, ONNX fp32, ONNX int8) and each form's size.
- presage: its n-gram model built by its own `text2ngram` (1-, 2- and 3-grams) from the same
  train split, with its smoothed n-gram predictor only (no online learning, no recency
  cache, as the LSTM has neither). Its suggestions come from libpresage's C API through
  ctypes, and the same simulation is applied to them (presage's suggestions that are not
  words of letters and digits, such as its "unk", are skipped and the next taken). Its own
  `presage_simulator` is also run on the same lines: its definition differs (below).
- with --browser: the exported page in headless Chromium: 200 held-out prompts typed in,
  the share whose three suggestions equal PyTorch's in order, and the time of an update.

Needs presage (Debian: apt-get install presage); without it the presage rows say so.
Prints a markdown table on stdout; --json writes everything measured.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """<?xml version="1.0" encoding="UTF-8" standalone="no" ?>
<Presage>
  <PredictorRegistry><LOGGER>ERROR</LOGGER><PREDICTORS>NgramPredictor</PREDICTORS></PredictorRegistry>
  <ContextTracker><LOGGER>ERROR</LOGGER><SLIDING_WINDOW_SIZE>80</SLIDING_WINDOW_SIZE>
    <LOWERCASE_MODE>no</LOWERCASE_MODE><ONLINE_LEARNING>no</ONLINE_LEARNING></ContextTracker>
  <Selector><LOGGER>ERROR</LOGGER><SUGGESTIONS>{suggestions}</SUGGESTIONS><REPEAT_SUGGESTIONS>yes</REPEAT_SUGGESTIONS>
    <GREEDY_SUGGESTION_THRESHOLD>0</GREEDY_SUGGESTION_THRESHOLD></Selector>
  <PredictorActivator><LOGGER>ERROR</LOGGER><PREDICT_TIME>1000</PREDICT_TIME>
    <MAX_PARTIAL_PREDICTION_SIZE>60</MAX_PARTIAL_PREDICTION_SIZE><COMBINATION_POLICY>Meritocracy</COMBINATION_POLICY>
  </PredictorActivator>
  <ProfileManager><LOGGER>ERROR</LOGGER><AUTOPERSIST>false</AUTOPERSIST></ProfileManager>
  <Predictors>
    <NgramPredictor><PREDICTOR>SmoothedNgramPredictor</PREDICTOR><LOGGER>ERROR</LOGGER>
      <DBFILENAME>{db}</DBFILENAME><DELTAS>0.01 0.1 0.89</DELTAS><LEARN>false</LEARN>
      <DatabaseConnector><LOGGER>ERROR</LOGGER></DatabaseConnector></NgramPredictor>
  </Predictors>
</Presage>
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    kind = "AMX" if "amx_bf16" in flags else "AVX-512 BF16, no AMX" if "avx512_bf16" in flags else "no AMX"
    return f"{model or platform.processor()} ({kind})"


class Presage:
    """libpresage's C API: the text typed so far in, its suggestions out."""

    def __init__(self, config: Path):
        name = ctypes.util.find_library("presage") or "libpresage.so.1"
        self.lib = ctypes.CDLL(name)
        callback = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
        self.past = ctypes.create_string_buffer(b"", 1 << 16)
        self.future = ctypes.create_string_buffer(b"", 1)
        # the callbacks return the buffers' addresses: a Python bytes result would leak
        self._past_cb = callback(lambda _: ctypes.addressof(self.past))
        self._future_cb = callback(lambda _: ctypes.addressof(self.future))
        self.handle = ctypes.c_void_p()
        rc = self.lib.presage_new_with_config(
            self._past_cb, None, self._future_cb, None, str(config).encode(), ctypes.byref(self.handle)
        )
        if rc != 0:
            raise RuntimeError(f"presage_new_with_config failed ({rc})")

    def predict(self, text: str) -> list[str]:
        encoded = text.encode()[-(len(self.past) - 1) :]
        self.past.value = encoded
        out = ctypes.POINTER(ctypes.c_char_p)()
        if self.lib.presage_predict(self.handle, ctypes.byref(out)) != 0:
            raise RuntimeError("presage_predict failed")
        words, i = [], 0
        while out[i]:
            words.append(out[i].decode(errors="replace"))
            i += 1
        self.lib.presage_free_string_array(out)
        return words

    def close(self) -> None:
        self.lib.presage_free(self.handle)


def presage_available() -> bool:
    return bool(shutil.which("text2ngram") and (ctypes.util.find_library("presage") or _can_load()))


def _can_load() -> bool:
    try:
        ctypes.CDLL("libpresage.so.1")
        return True
    except OSError:
        return False


def build_presage(train: Path, work: Path, k: int) -> Path:
    """text2ngram's 1-, 2- and 3-gram tables of the train text, and a config that reads them."""
    db = work / "ngrams.db"
    for n in (1, 2, 3):
        subprocess.run(
            ["text2ngram", "-n", str(n), "-f", "sqlite", "-a", "-o", str(db), str(train)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    config = work / "presage.xml"
    config.write_text(CONFIG.format(db=db, suggestions=k + 5))  # room to skip non-words
    return config


def simulate_presage(presage: Presage, lines: list[str], k: int) -> dict:
    """The same simulation as inference/keystrokes.py, on presage's suggestions. Each line
    is typed as a text of its own (presage's context is the line so far)."""
    words_typed = without = with_ = top1 = topk = calls = 0
    started = time.perf_counter()
    for line in lines:
        words = line.split()
        for n, word in enumerate(words):
            if not word.isalnum():
                continue
            words_typed += 1
            without += len(word) + 1
            context = " ".join(words[:n])
            cost = len(word) + 1
            for j in range(len(word)):
                typed = f"{context} {word[:j]}" if context else word[:j]
                offered = [w for w in presage.predict(typed) if w.isalnum() and w != "unk"][:k]
                calls += 1
                if j == 0:
                    top1 += offered[:1] == [word]
                    topk += word in offered
                if word in offered:
                    cost = j + 1
                    break
            with_ += cost
    return {
        "k": k,
        "words": words_typed,
        "keystrokes_without": without,
        "keystrokes_with": with_,
        "savings": round(1 - with_ / without, 4),
        "top1": round(top1 / words_typed, 4),
        "topk": round(topk / words_typed, 4),
        "ms_per_prediction": round((time.perf_counter() - started) * 1000 / max(calls, 1), 3),
    }


def presage_simulator(config: Path, text: Path) -> dict:
    """presage's own simulator on the text: its KSR = 1 - (ki + ks) / kn."""
    out = subprocess.run(
        ["presage_simulator", "-q", "-c", str(config), str(text)], check=True, capture_output=True, text=True
    ).stdout
    got = {
        key: float(m.group(1))
        for key in ("ki", "ks", "kn", "KSR")
        if (m := re.search(rf"^{key}\s*:\s*([\d.]+)", out, re.M))
    }
    return {"ki": int(got["ki"]), "ks": int(got["ks"]), "kn": int(got["kn"]), "savings": round(got["KSR"] / 100, 4)}


def screenshot(driver, box, path: Path, text: str = "the company said it would be") -> Path:
    """The page with `text` typed, as docs/keyboard.md shows it."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(800, 600)
    driver.execute_script("arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input'))", box)
    box.send_keys(text)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.lstmKeyboard.shownFor") == text)
    driver.save_screenshot(str(path))
    return path


def browser_check(lm, lines: list[str], prompts: int = 200) -> dict:
    """The exported page in headless Chromium: agreement with PyTorch, and update times."""
    import functools
    import http.server
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lstm_lm.inference.keyboard import export_web
    from lstm_lm.inference.keystrokes import held_out_prompts

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        export_web(lm, site)

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        page = "return window.lstmKeyboard"
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.execute_script(page + " && window.lstmKeyboard.ready"))
            box = driver.find_element(By.ID, "text")
            same = 0
            chosen = held_out_prompts(lines, prompts)
            for prompt in chosen:
                box.clear()
                box.send_keys(prompt)
                wait.until(lambda d, p=prompt: d.execute_script(page + ".shownFor") == p)
                same += driver.execute_script(page + ".shown") == lm.suggest(prompt, 3)
            timings = driver.execute_script(page + ".timings")
            shot = screenshot(driver, box, ROOT / "docs" / "keyboard-page.png")
            model_bytes = (site / "model.onnx").stat().st_size
        finally:
            driver.quit()
            server.shutdown()
    stepped = sorted(t["ms"] for t in timings if t["steps"] == 1)
    every = sorted(t["ms"] for t in timings)

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    return {
        "prompts": len(chosen),
        "same_top3": same,
        "share_same": round(same / len(chosen), 4),
        "update_ms": {"p50": pct(every, 0.5), "p95": pct(every, 0.95), "updates": len(every)},
        "word_step_ms": {"p50": pct(stepped, 0.5), "p95": pct(stepped, 0.95), "updates": len(stepped)},
        "model_bytes": model_bytes,
        "screenshot": str(shot.relative_to(ROOT)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/keyboard")
    p.add_argument("--data", default=None, help="The corpus (default: the one the model was trained on).")
    p.add_argument("-k", "--suggestions", type=int, default=3)
    p.add_argument("--lines", type=int, default=1000, help="Test lines that both engines type (presage is slow).")
    p.add_argument("--browser", action="store_true", help="Also check the exported page in headless Chromium.")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from lstm_lm import LanguageModel
    from lstm_lm.data import resolve_source
    from lstm_lm.inference.keyboard import latency
    from lstm_lm.inference.keystrokes import simulate, split_lines

    lm = LanguageModel.load(args.checkpoint)
    test = split_lines(lm, "test", args.data)
    lines = test[: args.lines]
    k = args.suggestions
    out: dict = {"machine": machine(), "checkpoint": args.checkpoint, "k": k, "lines": len(lines)}
    out["model"] = {"cell": lm.cell, "parameters": lm.model.num_parameters(), "vocab": lm.vocab_size}
    log(f"lstm-lm: typing {len(lines)} test lines, then all {len(test)} ...")
    out["lstm_lm"] = simulate(lm, lines, k).as_dict()
    out["lstm_lm_whole_test"] = simulate(lm, test, k).as_dict()
    log("lstm-lm: timing suggestions at batch 1 on one thread ...")
    out["latency"] = latency(lm, test, k)
    source = resolve_source(args.data or lm.config.data.source)
    if source.files is None or "train" not in source.files:
        log("presage: needs a corpus directory with a train split; skipped")
    elif not presage_available():
        log("presage: not installed (Debian: apt-get install presage); skipped")
        out["presage"] = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            log("presage: building its 1-, 2- and 3-gram tables with text2ngram ...")
            config = build_presage(source.files["train"], work, k)
            text = work / "test.txt"
            text.write_text("\n".join(lines) + "\n")
            presage = Presage(config)
            log(f"presage: typing {len(lines)} test lines through its C API ...")
            out["presage"] = simulate_presage(presage, lines, k)
            presage.close()
            log("presage: its own presage_simulator on the same lines ...")
            (work / "simulator.xml").write_text(CONFIG.format(db=work / "ngrams.db", suggestions=k))
            out["presage_simulator"] = presage_simulator(work / "simulator.xml", text)
    if args.browser:
        log("browser: exporting the page and typing 200 held-out prompts in headless Chromium ...")
        out["browser"] = browser_check(lm, test)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))


def table(out: dict) -> str:
    k, rows = out["k"], []
    m, p = out["lstm_lm"], out.get("presage")
    rows.append(f"| engine | keystroke savings | top-1 recall | top-{k} recall | words |")
    rows.append("|---|---|---|---|---|")
    rows.append(
        f"| lstm-lm ({out['model']['cell']}, {out['model']['parameters']:,} parameters) | "
        f"{m['savings']:.1%} | {m['top1']:.1%} | {m['topk']:.1%} | {m['words']:,} |"
    )
    if p:
        rows.append(
            f"| presage (3-gram, text2ngram) | {p['savings']:.1%} | {p['top1']:.1%} | {p['topk']:.1%} | "
            f"{p['words']:,} |"
        )
    if s := out.get("presage_simulator"):
        rows.append(f"| presage_simulator's own KSR (its definition) | {s['savings']:.1%} | | | |")
    lat = out["latency"]
    rows += ["", "| form | p50 ms | p95 ms | bytes |", "|---|---|---|---|"]
    for form in ("pytorch", "onnx_fp32", "onnx_int8"):
        if form in lat:
            rows.append(f"| {form} | {lat[form]['p50_ms']} | {lat[form]['p95_ms']} | {lat[form]['bytes']:,} |")
    return "\n".join(rows) + f"\n\n{out['machine']}"


if __name__ == "__main__":
    main()
