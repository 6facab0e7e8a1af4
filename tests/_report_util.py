"""A real headless Chromium driven over the DevTools protocol, for the report tests.

The browser is started with `--remote-debugging-pipe`: protocol messages are JSON
terminated by NUL on fds 3 (to the browser) and 4 (from it), so no port, no websocket
library and no Python dependency are needed. `Browser.open(path)` loads a file in a fresh
tab and records what a test asserts on: console messages and uncaught exceptions, every
network request the page made, and any JavaScript dialog (alert) that opened.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("CNNX_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(Exception):
    pass


class Browser:
    def __init__(self, exe: str, *, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="cnnx-chromium-")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        args = [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", f"--user-data-dir={self.profile}", "about:blank"]
        # The browser reads fd 3 and writes fd 4; bash puts the pipe ends there and gives the
        # browser /dev/null as stdin/stdout so nothing else reaches the protocol stream.
        self.proc = subprocess.Popen(
            ["bash", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "chromium", *args],
            stdin=to_r, stdout=from_w, stderr=subprocess.DEVNULL, close_fds=True)
        os.close(to_r)
        os.close(from_w)
        self._next_id = 0
        self._replies: dict = {}
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        with os.fdopen(self._from_r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._cond:
                            self._replies[msg["id"]] = msg
                            self._cond.notify_all()
                    else:
                        self._events.put(msg)
        with self._cond:
            self._replies[None] = {"error": {"message": "browser closed the pipe"}}
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._next_id += 1
        ident = self._next_id
        msg = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while ident not in self._replies and None not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"{method}: no reply in {timeout or self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(ident, None) or self._replies[None]
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def events(self, wait: float = 0.0):
        """Events received so far (waiting up to `wait` seconds for the first one)."""
        out = []
        try:
            out.append(self._events.get(timeout=wait) if wait else self._events.get_nowait())
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return out

    def open(self, path: Path, *, width: int = 1280, height: int = 900, mobile: bool = False,
             scripts: bool = True) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        if not scripts:
            page.send("Emulation.setScriptExecutionDisabled", {"value": True})
        page.load(Path(path).resolve().as_uri())
        return page

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session
        self.console: list = []  # (level, text) of console messages, log entries and exceptions
        self.requests: list = []  # URLs the page requested
        self.dialogs: list = []  # messages of alert/confirm/prompt dialogs that opened
        self.loaded = False

    def send(self, method, params=None, **kw):
        return self.browser.send(method, params, session=self.session, **kw)

    def _pump(self, wait: float = 0.0):
        for ev in self.browser.events(wait):
            if ev.get("sessionId") != self.session:
                continue
            method, p = ev["method"], ev.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                self.console.append((p.get("type"), text))
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                self.console.append(("exception", d.get("exception", {}).get("description") or d.get("text")))
            elif method == "Log.entryAdded":
                e = p.get("entry", {})
                self.console.append((e.get("level"), e.get("text")))
            elif method == "Network.requestWillBeSent":
                self.requests.append(p["request"]["url"])
            elif method == "Page.javascriptDialogOpening":
                self.dialogs.append(p.get("message"))
                self.send("Page.handleJavaScriptDialog", {"accept": True})
            elif method == "Page.loadEventFired":
                self.loaded = True

    def load(self, url: str):
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.browser.timeout
        while not self.loaded:
            if time.monotonic() > deadline:
                raise CDPError(f"{url} did not finish loading")
            self._pump(0.2)
        self.settle()

    def settle(self, seconds: float = 0.3):
        """Collect the events of the next `seconds` (late console messages, requests)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._pump(0.05)

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        self._pump()
        if "exceptionDetails" in res:
            raise CDPError(f"{expression!r}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def screenshot(self, *, full_page: bool = True):
        """The rendered page as a Pillow RGB image (CSS pixels at scale 1)."""
        from PIL import Image

        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            w, h = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self):
        self.browser.send("Target.closeTarget", {"targetId": self.target})


# ---- data for the report tests: real CIFAR JPEGs, a real ONNX model, the real CLI ----------

# Names that would run script if a report pasted them into markup unescaped. A class name
# can hold anything (it comes from model metadata); a folder or file name cannot hold '/'.
HOSTILE_CLASS = "<script>window.__pwned=1;alert(1)</script>"
HOSTILE_FOLDER = "<svg onload=window.__pwned=2;alert(2)>"
HOSTILE_FILE = "<img src=x onerror=alert(1)>.jpg"
FORMULA_FILE = "=HYPERLINK(1).jpg"  # written as '=... in the CSV; the page must show it unescaped
CLASSES = ["airplane", "automobile", "bird", HOSTILE_CLASS, "deer", "dog", "frog", "horse", "ship", "truck"]


def classify_folder(src: Path, dest: Path) -> dict:
    """dest/ holding copies of the real JPEGs under src/<class>/ (in a hostile subfolder
    name), one under a hostile file name, one under a formula-like name, one whose name is
    not UTF-8, and a broken file that lands in the errors file. Returns what was made."""
    sources = sorted(p for p in Path(src).rglob("*.jpg"))
    (dest / HOSTILE_FOLDER).mkdir(parents=True)
    for p in sources[3:]:
        shutil.copyfile(p, dest / HOSTILE_FOLDER / f"{p.parent.name}-{p.name}")
    shutil.copyfile(sources[0], dest / HOSTILE_FILE)
    shutil.copyfile(sources[1], dest / FORMULA_FILE)
    shutil.copyfile(sources[2], os.path.join(os.fsencode(dest), b"caf\xe9.jpg"))
    (dest / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"images": len(sources), "broken": 1}


def run_classify(folder: Path, model: Path, out: Path, *extra: str, cwd=None):
    import sys

    return subprocess.run([sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model),
                           "-o", str(out), *extra], capture_output=True, text=True, timeout=180, cwd=cwd)


def val_predictions(src: Path, model: Path, class_names):
    """(Predictions, confusion) of a real ONNX model on real JPEGs under src/<class>/: what
    `cnnx train` hands the report for its validation split."""
    import numpy as np

    from cnnx.report import Predictions
    from cnnx.runtime.model import open_model
    from cnnx.runtime.preprocess import load_image

    folders = sorted(p for p in Path(src).iterdir() if p.is_dir())
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for f in sorted(folder.iterdir()):
            paths.append(str(f))
            labels.append(label)
    session, info, _ = open_model(model, "cpu")
    images = np.stack([load_image(p, info.spec)[0] for p in paths])
    logits = session.run([info.output_name], {info.input_name: images})[0].astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    confusion = np.zeros((len(class_names),) * 2, dtype=np.int64)
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    return Predictions(images=images, labels=labels, probs=probs, paths=paths), confusion.tolist()


def history_rows(epochs: int, num_classes: int) -> list:
    """Per-epoch rows shaped like cnnx.train.run's (a plausible run's numbers)."""
    rows, total = [], 0.0
    for e in range(1, epochs + 1):
        total += 29.5
        frac = e / epochs
        rows.append({"epoch": e, "lr": 0.4 * min(1.0, frac / 0.2) * (1 - frac) + 1e-4, "train_loss": 2.2 - 1.4 * frac,
                     "train_top1": 0.3 + 0.63 * frac, "train_top5": 0.8 + 0.19 * frac, "val_loss": 1.5 - 0.95 * frac,
                     "val_top1": 0.46 + 0.42 * frac, "val_top5": 0.9 + 0.09 * frac, "seconds": 29.5,
                     "eval_seconds": 4.3, "train_seconds_total": total,
                     "train_per_class": [0.3 + 0.6 * frac] * num_classes,
                     "val_per_class": [0.4 + 0.45 * frac] * num_classes})
    return rows


def training_config(data: str, class_names) -> dict:
    return {"arch": "seed-cnn", "data": data, "epochs": 17, "batch_size": 512, "lr": 0.4, "aug": ["crop", "flip"],
            "preprocess": {"size": [32, 32], "resize": "shorter-side+center-crop"}, "num_classes": len(class_names),
            "class_names": list(class_names), "train_images": 45000, "val_images": 5000}
