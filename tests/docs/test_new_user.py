"""A new user's path, as they would walk it: a fresh clone, `make run` twice, a second instance,
`cityops tail`, and every `cityops` command of the README, run as written.

The clone is of this repository's committed HEAD. Its `.venv` is made by the Makefile's own
recipe (`make run` runs `pip install -e '.[test]'` as for anyone); only the dependencies are
not downloaded again: a `.pth` file points the new venv at the packages this test run already
has, so pip finds them installed and installs just cityops itself, from the clone. Ports are
free ones (CITYOPS_EMBEDDED__PORT, CITYOPS_HTTP__PORT), never 1883."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import free_port
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("街镇", "区级", "市级", "部门", "网格员")
ERROR = "cityops: error: "


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("new-user") / "cityops"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True, timeout=120)
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(python), "-m", "venv", str(where / ".venv")], check=True, timeout=120)
    site = sysconfig.get_paths(vars={"base": str(where / ".venv"),
                                     "platbase": str(where / ".venv")})["purelib"]
    Path(site, "_dependencies_of_this_test_run.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where


@pytest.fixture(scope="module")
def ports() -> dict[str, str]:
    return {"CITYOPS_EMBEDDED__PORT": str(free_port()), "CITYOPS_HTTP__PORT": str(free_port()),
            "CITYOPS_OPSCENTRE__PORT": str(free_port())}       # the console beside make run


def _env(ports: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CITYOPS_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(ROOT)))     # no cityops of ours
    return {**env, **ports}


class Shell:
    """``line`` in bash, in the clone, after the README's `. .venv/bin/activate`; its output in
    files beside the clone."""

    count = 0

    def __init__(self, line: str, clone: Path, ports: dict[str, str]) -> None:
        Shell.count += 1
        self.line = line
        self.out = clone.parent / f"shell-{Shell.count}.out"
        self.err = clone.parent / f"shell-{Shell.count}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(["bash", "-c", f". .venv/bin/activate && {line}"],
                                         cwd=clone, env=_env(ports), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.line}: still running after {timeout} s\n"
                                 f"{self.output()}") from None
        return self.proc.returncode, self.out.read_text(), self.err.read_text()

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class MakeRun:
    """`make run` in the clone: its console in a file, stopped with Ctrl-C (SIGINT to its
    process group, as a terminal does)."""

    def __init__(self, clone: Path, ports: dict[str, str], n: int) -> None:
        self.out = clone.parent / f"make-run-{n}.txt"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(["make", "run"], cwd=clone, env=_env(ports), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, done, timeout: float) -> float:
        """Seconds until ``done(console)`` held."""
        start = time.monotonic()

        def held() -> bool:
            if done(self.text()):
                return True
            assert self.proc.poll() is None, f"make run exited {self.proc.returncode}:\n{self.text()}"
            return False
        wait_until(held, timeout, "seen on the console", interval=0.1, detail=self.text)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"make run did not stop on Ctrl-C:\n{self.text()}") from None
        # make is gone; what it started (the pipeline, the console) must be gone too, or it
        # would go on running into later tests' ports
        try:
            wait_until(lambda: not _group_alive(self.proc.pid), 30, "what make run started gone",
                       interval=0.1)
        except AssertionError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"make run left processes running after Ctrl-C:\n{self.text()}") from None
        assert "Traceback" not in self.text(), self.text()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def every_tier(console: str) -> bool:
    after = console.split("cityops is running", 1)[-1]
    return all(f" {tier} " in after for tier in TIERS)


@pytest.fixture(scope="module")
def first_run(clone: Path, ports: dict[str, str]) -> Iterator[MakeRun]:
    run = MakeRun(clone, ports, 1)
    try:
        run.wait_for(lambda t: "cityops is running" in t, 300)    # includes making .venv
        yield run
    finally:
        run.stop()


def test_make_run_shows_notices_at_every_tier(first_run: MakeRun) -> None:
    first_run.wait_for(every_tier, 30)


def test_a_second_instance_is_refused_with_one_line(first_run: MakeRun, clone: Path,
                                                    ports: dict[str, str]) -> None:
    _, out, err = Shell("cityops run --simulate", clone, ports).wait(60)
    assert re.fullmatch(ERROR + r"\.run/cityops-state\.sqlite: in use by another cityops "
                        r"\(pid \d+\); stop it first, or give this one its own --state\n", err), err


def test_cityops_tail_shows_a_notice(first_run: MakeRun, clone: Path, ports: dict[str, str]) -> None:
    code, out, err = Shell("cityops tail --count 1", clone, ports).wait(90)
    assert code == 0, err
    assert any(f" {tier} " in out for tier in TIERS) and "【" in out, out


def test_the_second_make_run_tells_the_story_again(first_run: MakeRun, clone: Path,
                                                   ports: dict[str, str]) -> None:
    first_run.wait_for(every_tier, 30)
    first_run.stop()
    again = MakeRun(clone, ports, 2)
    try:
        again.wait_for(lambda t: "cityops is running" in t, 120)
        assert again.wait_for(every_tier, 10) < 10          # every tier within 10 s of the banner
        assert "a fresh simulated city" in again.text()
    finally:
        again.stop()


# ---- every `cityops` command of the README, as written ------------------------------------------

def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith("cityops ")]


# What each does when run as written here. "ok": exits 0. "live": runs until Ctrl-C (a pipeline,
# a watcher), then exits 0. "placeholder": names a machine the README makes up (10.0.0.x, your
# cityops.yaml): it must end in one clear line, no traceback.
EXPECTED = {
    "cityops tail": "live",
    "cityops --help": "ok",
    "cityops rules check": "ok",
    "cityops rules test tests/rules/": "ok",
    "cityops route --rule gas.leak --sensor gas-510104-000001 --at 2026-07-01T23:30": "ok",
    "cityops run --simulate": "live",
    "cityops run --broker mqtt://10.0.0.5:1883": "placeholder",
    "cityops run --config cityops.yaml": "placeholder",
    "cityops tail --tier street --district 锦江区": "live",
    "cityops tail --broker mqtt://10.0.0.5:1883 --tier dead --count 10": "placeholder",
    "cityops bridge --broker mqtt://10.0.0.5:1883 --kafka 10.0.0.7:9092": "placeholder",
    "cityops worker --kafka 10.0.0.7:9092": "placeholder",
    "cityops console --config cityops.yaml": "placeholder",
    "cityops console --kafka 10.0.0.7:9092": "placeholder",
    "cityops console --hash-password": "placeholder",       # no password on its input: one line
    "cityops rules diff cityops.yaml cityops-next.yaml": "placeholder",   # README: Hot reload
    # against make run's HTTP port, without the README's made-up token: one clear line
    "cityops silence add --match street=510104020 --for 2h --reason 燃气管网检修": "placeholder",
    "cityops silence add --match district=510104 --match category=waterlogging --until "
    "2026-07-02T06:00:00+08:00 --reason 泵站检修": "placeholder",
    'cityops silence add --match grid=510104020001001 --window "sat,sun 23:00-02:00 '
    'Asia/Shanghai" --reason 周末夜间管道维护': "placeholder",
    "cityops silence list": "placeholder",
    "cityops silence end s-3f9a0c21d4": "placeholder",
    "cityops replay docs/examples/gas-leak.jsonl > notices.jsonl": "ok",
    "cityops replay docs/examples/gas-leak.jsonl --rules 'gas.*' --ack-after 5m --out acked.jsonl": "ok",
    "cityops replay pipeline/fixtures/chengdu/uci_chengdu_pm25_weather_2010_2015.csv --csv-map "
    "pipeline/fixtures/chengdu/uci_chengdu.map.yaml --rules 'weather.*' --out notices.jsonl": "ok",
    "cityops backtest --rules builtin --params docs/examples/rain30.yaml --against builtin --history "
    "pipeline/fixtures/chengdu/uci_chengdu_pm25_weather_2010_2015.csv --csv-map "
    "pipeline/fixtures/chengdu/uci_chengdu.map.yaml --html rainstorm.html": "ok",
    "cityops backtest --rules packs-next/ --against packs-live/ --params city.yaml --against-params "
    "city.yaml --history 2026-07.jsonl --ack-after 5m --json figures.json": "placeholder",
    "cityops backtest --rules packs-next/ --against packs-live/ --history influx://10.0.0.7:8428 "
    "--from 2026-07-01 --to 2026-07-31T23:59:59": "placeholder",
}


def test_the_readme_names_no_command_this_test_does_not_run() -> None:
    commands = [c.split("  #")[0].strip() for c in readme_commands()]
    assert set(commands) == set(EXPECTED), set(commands) ^ set(EXPECTED)


def test_every_readme_command_runs_as_written(clone: Path, ports: dict[str, str],
                                              first_run: MakeRun) -> None:
    """The live ones run against a running `make run` (tail) or on their own (run --simulate,
    once make run has stopped: one pipeline per state)."""
    first_run.stop()
    lines = {c.split("  #")[0].strip(): c for c in readme_commands()}
    city = MakeRun(clone, ports, 3)
    city.wait_for(lambda t: "cityops is running" in t, 120)
    started = {cmd: Shell(line, clone, ports) for cmd, line in lines.items()
               if EXPECTED[cmd] != "live" or cmd.startswith("cityops tail")}
    try:
        for cmd, sh in started.items():
            if EXPECTED[cmd] == "live":
                _check_live(cmd, sh, "cityops tail:")
        for cmd, sh in started.items():
            if EXPECTED[cmd] != "live":
                _check(cmd, *sh.wait(240))
    finally:
        for sh in started.values():
            sh.kill()
        city.stop()
    for cmd in [c for c in lines if EXPECTED[c] == "live" and not c.startswith("cityops tail")]:
        _check_live(cmd, Shell(lines[cmd], clone, ports), "cityops is running")


def _check_live(cmd: str, sh: Shell, banner: str) -> None:
    """It runs (its banner on stdout or stderr) until Ctrl-C, then exits 0, no traceback."""
    try:
        def up() -> bool:
            if banner in sh.output():
                return True
            assert sh.proc.poll() is None, f"{cmd} exited {sh.proc.returncode}: {sh.output()}"
            return False
        wait_until(up, 120, f"{cmd}: {banner!r}", interval=0.2, detail=sh.output)
        sh.interrupt()
        code, out, err = sh.wait(30)
        assert code == 0 and "Traceback" not in out + err, (cmd, code, out + err)
    finally:
        sh.kill()


def _check(cmd: str, code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, (cmd, out, err)
    if EXPECTED[cmd] == "ok":
        assert code == 0, (cmd, code, out[-2000:], err[-2000:])
        return
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 1 and last.startswith(ERROR), (cmd, code, err)
    if cmd.startswith(("cityops run", "cityops tail")):    # ours alone: exactly one line
        assert err.strip() == last, (cmd, err)
