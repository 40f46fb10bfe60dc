"""Helpers for the console's browser tests (no pytest in it): a `cityops console` process,
a users file with hashed passwords, and a headless Debian Chromium driven by Playwright.

The browser is the system's (`apt-get install chromium`, done by `make test-deps`): Playwright
never downloads one here. Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bench.harness.brokers import free_port
from pipeline.runtimes.opscentre.auth import hash_password

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery staple"
PHONE = {"width": 390, "height": 844}


def users_file(path: Path, users: dict[str, dict]) -> Path:
    """acks.users with every user's password set to PASSWORD (hashed)."""
    hashed = hash_password(PASSWORD)
    path.write_text(yaml.safe_dump({"users": {u: {**spec, "password": hashed}
                                              for u, spec in users.items()}}, allow_unicode=True))
    return path


class Console:
    """One `cityops console` (restartable: same database, same port, same session)."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str], name: str = "console"):
        self.tmp, self.args, self.env, self.name = tmp, args, env, name
        self.port = free_port()
        self.db = tmp / f"{name}.sqlite"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Console:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
        env.update(self.env)
        self.err = self.tmp / f"{self.name}-{self.starts}.stderr"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "console", "--port", str(self.port),
                 "--db", str(self.db), *self.args], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"console exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass                    # not answering yet: try again
            time.sleep(0.1)             # polls /healthz (a wait on it; the process checked each time)
        raise AssertionError(f"console not healthy within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"console did not stop within {timeout} s of SIGTERM\n{self.log()}") from None

    def log(self) -> str:
        return "".join((self.tmp / f"{self.name}-{i}.stderr").read_text(errors="replace")[-4000:]
                       for i in range(1, self.starts + 1)
                       if (self.tmp / f"{self.name}-{i}.stderr").exists())


def login(browser, console: Console, user: str, viewport: dict | None = None):
    """A fresh browser context (its own cookies) logged in as ``user``; returns its page."""
    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 900},
                                  locale="zh-CN", timezone_id="Asia/Shanghai")
    page = context.new_page()
    page.goto(f"{console.url}/login")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/login" not in page.url, f"{user} could not log in: {page.content()[:500]}"
    return page


def api(page, path: str) -> tuple[int, dict]:
    """GET an API path with the page's session (its cookies)."""
    r = page.request.get(page.url.split("/", 3)[0] + "//" + page.url.split("/", 3)[2] + path)
    return r.status, json.loads(r.body() or b"{}")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
