"""The rule language's docs cannot rot (links and named files: tests/docs/test_docs.py).

Every YAML example in docs/rules.md and docs/routing.md that is a whole rule pack (a mapping
with `pack:`), a params file (pack name -> {params, districts}) or a routing tree (`tiers:`) is
loaded through the real loader (rules.compiler.load_rules) and bound to the Chengdu fixture
registry; every rule test (`steps:` and `expect:`) is run by `cityops rules test`'s own runner,
with the packs of the same page saved as `<pack>.yaml` next to it. Every other YAML block must
at least parse. The pages show the built-in routing tree as it is, a worked example of every
rule type, and name every field of the rule language, the rule tests, the engine settings, the
routing tree and every template field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.engine import Engine
from pipeline.core.registry import Registry
from pipeline.core.registry import load as load_registry
from pipeline.tools import rule_tests as testing
from rules.compiler import load_rules
from rules.types.base import TYPES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLE_DOCS = [DOCS / "rules.md", DOCS / "routing.md"]
RULE_TYPES = set(TYPES)          # every registered rule type

_FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.M | re.S)


class Block:
    def __init__(self, doc: Path, line: int, lang: str, text: str) -> None:
        self.doc, self.line, self.lang, self.text = doc, line, lang, text
        self.data: Any = None
        self.error: str | None = None
        try:
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            self.error = str(exc)

    @property
    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"

    @property
    def kind(self) -> str:
        d = self.data
        if not isinstance(d, dict) or not d:
            return "fragment"
        if "pack" in d:
            return "pack"
        if "steps" in d and "expect" in d:
            return "test"
        if "tiers" in d:
            return "routing"
        if all(isinstance(v, dict) and v and set(v) <= {"params", "districts"} for v in d.values()):
            return "params"
        return "fragment"


def fenced(doc: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, body) of every fenced block."""
    text = doc.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m[2].strip(), m[3]) for m in _FENCE.finditer(text)]


def yaml_blocks(doc: Path) -> list[Block]:
    return [Block(doc, line, info, body) for line, info, body in fenced(doc)
            if info.split()[:1] in (["yaml"], ["yml"])]


BLOCKS = [b for doc in EXAMPLE_DOCS if doc.exists() for b in yaml_blocks(doc)]


def _of(kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.kind == kind]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


@pytest.fixture(scope="module")
def registry_cache() -> dict[str, Registry]:
    return {}


def _save_packs(doc: Path, folder: Path) -> dict[str, Path]:
    """Every pack of ``doc`` as ``folder/<pack>.yaml`` (how the page's rule tests name them)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for b in _of("pack"):
        if b.doc == doc:
            path = folder / f"{b.data['pack']}.yaml"
            assert path.name not in {p.name for p in out.values()}, \
                f"{b.where}: two packs named {b.data['pack']} on one page"
            path.write_text(b.text, encoding="utf-8")
            out[b.data["pack"]] = path
    return out


# ---- (a) the examples ------------------------------------------------------------------------

def test_the_pages_exist_and_hold_examples():
    for doc in EXAMPLE_DOCS:
        assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    by_doc = {doc.name: {b.kind for b in BLOCKS if b.doc == doc} for doc in EXAMPLE_DOCS}
    assert {"pack", "test", "params"} <= by_doc["rules.md"], by_doc
    assert "routing" in by_doc["routing.md"], by_doc
    # a worked example (a pack and a rule test of it) for every rule type
    types = {r["type"] for b in _of("pack") if b.doc.name == "rules.md" for r in b.data.get("rules", [])}
    assert RULE_TYPES <= types, f"rules.md has no pack with a rule of type {sorted(RULE_TYPES - types)}"
    tested = {p.removesuffix(".yaml") for b in _of("test") for p in b.data.get("packs", [])}
    covered = {r["type"] for b in _of("pack") if b.doc.name == "rules.md" and b.data["pack"] in tested
                for r in b.data.get("rules", [])}
    assert RULE_TYPES <= covered, f"no rule test runs a {sorted(RULE_TYPES - covered)} example"


@pytest.mark.parametrize("block", BLOCKS, ids=_ids(BLOCKS))
def test_every_yaml_block_parses(block: Block):
    assert block.error is None, f"{block.where}: not YAML: {block.error}"


@pytest.mark.parametrize("block", _of("pack"), ids=_ids(_of("pack")))
def test_pack_example_loads(block: Block, tmp_path: Path, registry_cache: dict):
    path = tmp_path / f"{block.data['pack']}.yaml"
    path.write_text(block.text, encoding="utf-8")
    rs = load_rules(extra=[path])
    ids = {r.spec.id for r in rs.rules if r.pack.pack == block.data["pack"]}
    assert ids == {r["id"] for r in block.data.get("rules", [])}
    # bound to a registry: per-sensor thresholds, `where:`, modifiers, templates
    if "" not in registry_cache:
        registry_cache[""] = load_registry(None, rs.kinds)
    Engine(registry_cache[""], rs)


@pytest.mark.parametrize("block", _of("params"), ids=_ids(_of("params")))
def test_params_example_loads(block: Block, tmp_path: Path):
    _save_packs(block.doc, tmp_path / "packs")
    path = tmp_path / "params.yaml"
    path.write_text(block.text, encoding="utf-8")
    rs = load_rules(extra=[tmp_path / "packs"], params=path)
    packs = {p.pack: p for p in rs.packs}
    for name, body in block.data.items():
        for param, v in (body.get("params") or {}).items():
            assert packs[name].params[param] == v
        for code, values in (body.get("districts") or {}).items():
            for param, v in values.items():
                assert packs[name].districts[code][param] == v


@pytest.mark.parametrize("block", _of("routing"), ids=_ids(_of("routing")))
def test_routing_example_loads(block: Block, tmp_path: Path, registry_cache: dict):
    path = tmp_path / "routing.yaml"
    path.write_text(block.text, encoding="utf-8")
    rs = load_rules(routing=path)
    assert len(rs.routing.routes) == len(block.data.get("routes") or [])
    if "" not in registry_cache:
        registry_cache[""] = load_registry(None, rs.kinds)
    Engine(registry_cache[""], rs)


def test_the_built_in_tree_is_shown_as_it_is():
    built_in = yaml.safe_load((ROOT / "rules" / "routing.yaml").read_text(encoding="utf-8"))
    shown = [b for b in _of("routing") if b.doc.name == "routing.md"]
    assert any(b.data == built_in for b in shown), \
        "docs/routing.md must show rules/routing.yaml as it is (a routing block equal to it)"


def _test_id(b: Block) -> str:
    return f"{b.where} {b.data.get('name', '')}" if isinstance(b.data, dict) else b.where


@pytest.mark.parametrize("block", _of("test"), ids=[_test_id(b) for b in _of("test")])
def test_worked_example_runs(block: Block, tmp_path: Path, registry_cache: dict):
    packs = _save_packs(block.doc, tmp_path)
    for p in block.data.get("packs", []):
        assert p.removesuffix(".yaml") in packs, \
            f"{block.where}: packs: {p} is not a pack on {block.doc.name} (name them <pack>.yaml)"
    path = tmp_path / "example_test.yaml"
    path.write_text(block.text, encoding="utf-8")
    failures = testing.run_file(path, registry_cache)
    assert not failures, f"{block.where}: the example does not do what the page says:\n  " + \
        "\n  ".join(failures)


def _code_words(doc: Path) -> set[str]:
    """Every word inside the page's inline code spans and code blocks."""
    text = doc.read_text(encoding="utf-8")
    spans = [m[0] for m in _FENCE.finditer(text)]
    spans += [m[0] for m in _INLINE_CODE.finditer(_FENCE.sub("", text))]
    return {w for span in spans for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


def _fields(*models: Any) -> set[str]:
    return {f.alias or name for m in models for name, f in m.model_fields.items()}


def test_every_field_is_documented():
    """A field added to the rule language, the rule tests, the engine settings or the routing
    tree, or a template field, is a field the pages must name."""
    from pipeline.core.engine import EngineSettings
    from rules import schema as s
    from rules.compiler import TEMPLATE_FIELDS
    from rules.types.window import Window

    rules_words = _code_words(DOCS / "rules.md")
    want = _fields(s.Pack, s.SensorKind, s.Level, s.Modifier, s.Flapping, Window,
                   *(t.schema for t in TYPES.values()), EngineSettings, testing.RuleTest, testing.Step,
                   testing.TestReading, testing.TestAck, testing.Expect) | TEMPLATE_FIELDS
    want |= {f for t in TYPES.values() for f in t.template_fields}
    assert not want - rules_words, f"docs/rules.md does not name {sorted(want - rules_words)}"
    routing_words = _code_words(DOCS / "routing.md")
    want = _fields(s.Routing, s.Route, s.Escalation) | s.MATCH_LABELS
    assert not want - routing_words, f"docs/routing.md does not name {sorted(want - routing_words)}"


# ---- (b) links ---------------------------------------------------------------------------------

_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
