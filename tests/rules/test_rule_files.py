"""Rule unit tests written as data (tests/rules/*.yaml, run by pipeline.tools.rule_tests like `promtool test
rules`): each file is its own pytest case, and `cityops rules test tests/rules/` runs them all.

Test-only rule packs live in tests/rules/packs/ (named by a test file's `packs:`); they are not
test files themselves, since only the *.yaml files directly in tests/rules/ are run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.core.registry import Registry
from pipeline.tools.rule_tests import run_file

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = ROOT / "tests" / "rules"
FILES = sorted(RULE_TESTS.glob("*.yaml"))

_registries: dict[str, Registry] = {}      # one registry load for all files, as the CLI does


def test_there_are_rule_test_files():
    assert len(FILES) >= 20, f"rule test files went missing from {RULE_TESTS}"


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_rule_file(path: Path):
    failures = run_file(path, _registries)
    assert not failures, f"{path.name}:\n  " + "\n  ".join(failures)


def test_cli_rules_test(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.main(["rules", "test", "tests/rules/"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines, "cityops rules test printed nothing"
    assert lines[-1] == f"{len(FILES)} passed, 0 failed", out
    assert code == 0, out
    # one line per file, each `ok` (the packs folder is not run as a test)
    assert [ln.split()[-1] for ln in lines[:-1] if ln.startswith(("ok ", "FAIL "))] == [f.name for f in FILES]
