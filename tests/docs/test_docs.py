"""The README and docs stand alone: every link and every file they or the CLI's messages name
is in the repository, and nothing points outside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted(ROOT.glob("deploy/**/*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path in the repository as the docs and messages write it: `docs/replay.md`, rules/packs/*.yaml
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|deploy|rules|pipeline|connectors|bench|tests)/"
                       r"[\w.*/-]*\w)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
# files the docs name that a command writes, not the repository
MADE = {"bench/out/kafka_bench.json": "make bench-kafka writes it",
        "bench/out": "the benchmarks write their JSON there (git-ignored)",
        "bench/out/console.json": "make bench-console writes it",
        "tests/artifacts": "the console's browser tests write their screenshots there",
        "deploy/.env": "the operator's copy of deploy/.env.example, never committed"}
SOURCES = sorted(p for d in ("pipeline", "connectors", "rules") for p in (ROOT / d).glob("*.py"))


def _exists(base: Path, target: str) -> bool:
    target = target.split("#")[0]
    return any(base.glob(target)) if "*" in target else (base / target).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_exists_and_none_leaves_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(CODE_SPAN.sub("", text)):    # `[确认接单](link)` is an example
        if re.match(r"[a-z]+:", target):                  # https://… : not a file
            continue
        resolved = (doc.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert _exists(doc.parent, target), f"{doc.name}: no file {target}"
    for name in ("INFRA.md", "ARCHITECTURE.md", "DOMAIN.md", "STYLE.md", "../shared"):
        assert name not in text, f"{doc.name} cites {name}, which is not in the repository"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = {p for p in REPO_PATH.findall(text) if not _exists(ROOT, p) and p not in MADE}
    assert not missing, f"{doc.name} names files the repository does not have: {sorted(missing)}"


def _strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_every_file_the_messages_name_exists() -> None:
    named = {(src.name, p) for src in SOURCES for s in _strings(src) for p in REPO_PATH.findall(s)}
    assert ("cli.py", "docs/replay.md") in named                   # the test sees the CLI's hints
    missing = sorted((src, p) for src, p in named if not _exists(ROOT, p))
    assert not missing, f"messages name files the repository does not have: {missing}"
