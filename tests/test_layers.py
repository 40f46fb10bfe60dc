"""Who may import whom, read from the source with `ast` (every import, a function's too).

The layers, lowest first; a package imports only those below it:

- connectors/ (brokers, Kafka, InfluxDB, push channels) know nothing of the domain: they import
  neither `pipeline` nor `rules`; they take plain values, settings-shaped objects and callables.
- rules/ (the rule language, the rule types) imports nothing of `pipeline`.
- pipeline/core/ (contracts, wire, registry, engine, lifecycle, routing, notices, replay) imports
  rules/ and connectors/ only.
- pipeline/shared/ (what the runtimes share: config, state, push, the ops HTTP face, metrics,
  topic names, logging) imports the core and below.
- pipeline/runtimes/ and pipeline/tools/ import shared and below; the runtimes do not import
  each other (`cityops run`: live.py; bridge.py; the worker: worker.py with reload_kafka.py; the
  console: opscentre/), and the tools import no runtime.
- pipeline/cli.py, the command line, may import anything: it starts the runtimes.

So no two packages import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = {
    "run": ("pipeline.runtimes.live",),
    "bridge": ("pipeline.runtimes.bridge",),
    "worker": ("pipeline.runtimes.worker", "pipeline.runtimes.reload_kafka"),
    "console": ("pipeline.runtimes.opscentre",),
}
TOP = ("pipeline.cli",)             # may start any runtime
# each layer and what it may import (besides itself and the standard library and third parties)
LAYERS = {
    "connectors": (),
    "rules": (),
    "pipeline.core": ("rules", "connectors"),
    "pipeline.shared": ("pipeline.core", "rules", "connectors"),
    "pipeline.runtimes": ("pipeline.shared", "pipeline.core", "rules", "connectors"),
    "pipeline.tools": ("pipeline.shared", "pipeline.core", "rules", "connectors"),
}
OURS = ("pipeline", "rules", "connectors")


def layer_of(name: str) -> str | None:
    return max((lay for lay in LAYERS if within(name, lay)), key=len, default=None)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from a import b``: a and a.b)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_of(name: str) -> str | None:
    for group, prefixes in RUNTIMES.items():
        if any(within(name, p) for p in prefixes):
            return group
    return None


def sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_the_graph_reads_imports_of_every_form() -> None:
    assert imports(ROOT / "pipeline" / "cli.py") >= {"pipeline.runtimes.live", "pipeline.runtimes.worker"}
    assert "pipeline.runtimes.opscentre.auth" in imports(ROOT / "pipeline" / "runtimes" / "opscentre" / "app.py")
    assert group_of("pipeline.runtimes.opscentre.app") == "console" and group_of("pipeline.runtimes") is None


def test_connectors_import_neither_pipeline_nor_rules() -> None:
    wrong = [f"{p.relative_to(ROOT)} imports {m}" for p in sources("connectors")
             for m in sorted(imports(p)) if within(m, "pipeline") or within(m, "rules")]
    assert not wrong, "\n".join(wrong)


def test_runtimes_do_not_import_each_other_and_nothing_below_imports_a_runtime() -> None:
    wrong = []
    for p in sources("pipeline"):
        here = module_name(p)
        if here in TOP:
            continue
        mine = group_of(here)
        for m in sorted(imports(p)):
            theirs = group_of(m)
            if theirs is not None and theirs != mine:
                who = f"runtime {mine!r}" if mine else "a module below the runtimes"
                wrong.append(f"{p.relative_to(ROOT)} ({who}) imports {m} (runtime {theirs!r})")
    assert not wrong, "\n".join(wrong)


def test_the_three_runtimes_implement_the_ops_runtime_protocol() -> None:
    """Each sets every attribute and defines every method that OpsRuntime (pipeline/shared/ops_runtime.py)
    names: what OpsHttpServer takes."""
    from pipeline.shared.ops_runtime import OpsRuntime

    wanted = {n for n in (*OpsRuntime.__annotations__, *vars(OpsRuntime)) if not n.startswith("_")}
    for path, name in (("pipeline/runtimes/live.py", "LiveRuntime"), ("pipeline/runtimes/bridge.py", "Bridge"),
                       ("pipeline/runtimes/worker.py", "CityWorker")):
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        has = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(cls):
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Assign):
                targets = [e for t in node.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            else:
                continue
            has |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name) and t.value.id == "self"}
        assert wanted <= has, f"{name} lacks {sorted(wanted - has)}"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for p in sources("pipeline", "rules", "connectors"):
        here = module_name(p)
        mine = layer_of(here)
        if here in TOP or here == "pipeline":
            continue
        assert mine is not None, f"{p.relative_to(ROOT)} is in no layer: put it in one (README, Where things are)"
        for m in sorted(imports(p)):
            if not m.startswith(OURS) or within(m, mine) or m in ("pipeline",):
                continue
            theirs = layer_of(m)
            if theirs is None or theirs not in LAYERS[mine]:
                wrong.append(f"{p.relative_to(ROOT)} ({mine}) imports {m} ({theirs or 'no layer'})")
    assert not wrong, "\n".join(wrong)


def test_no_two_packages_import_each_other() -> None:
    """The shape a newcomer can read: every edge between packages goes one way."""
    def package(name: str) -> str:
        return group_of(name) or layer_of(name) or name.split(".")[0]
    edges: set[tuple[str, str]] = set()
    for p in sources("pipeline", "rules", "connectors"):
        here = module_name(p)
        for m in imports(p):
            if m.startswith(OURS) and m != "pipeline" and package(m) != package(here):
                edges.add((package(here), package(m)))
    both = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not both, both
