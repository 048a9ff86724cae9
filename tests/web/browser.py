"""Python side of driver.mjs: one headless Chromium driven line by line (JSON over the node process's stdin/stdout)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here, or None. (CI installs them: see tests/web/INSTALL.sh.)"""
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (apt-get install chromium; see tests/web/INSTALL.sh)"
    if shutil.which("node") is None:
        return "node not found (apt-get install nodejs; see tests/web/INSTALL.sh)"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (cd tests/web && npm ci; see tests/web/INSTALL.sh)"
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, timeout: float = 30):
        self.timeout = timeout
        self.proc = subprocess.Popen(["node", str(HERE / "driver.mjs")], cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "CHROMIUM": CHROMIUM})
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 1
        self.version = self._reply(0)

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.replies.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.replies.put(None)

    def _reply(self, id_):
        while True:
            try:
                reply = self.replies.get(timeout=self.timeout)
            except queue.Empty:
                raise BrowserError(f"the browser driver did not answer within {self.timeout} s") from None
            if reply is None:
                raise BrowserError(f"the browser driver exited: {self.proc.stderr.read()[-2000:]}")
            if reply["id"] == id_:
                break
            # a late answer to a command that already timed out here: drop it, so one failure does not cascade
        if not reply["ok"]:
            raise BrowserError(reply["error"])
        return reply["value"]

    def call(self, op: str, **args):
        id_ = self.next_id
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": id_, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply(id_)

    def goto(self, url, width=1280, height=900):
        return self.call("goto", url=url, width=width, height=height)

    def eval(self, expr):
        return self.call("eval", expr=expr)

    def wait(self, expr, timeout=10000):
        return self.call("wait", expr=expr, timeout=timeout)

    def click(self, selector):
        return self.call("click", selector=selector)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
