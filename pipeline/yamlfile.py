"""YAML files that remember where things are, so every configuration error names file and line.

Rule packs, the registry and routing trees are data written by people; when one is wrong the
start stops with ``file:line: what is wrong and what to do``. PyYAML's SafeLoader builds the
data (nothing in a file is ever executed); the node tree it composes first gives the lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A configuration, registry or rule error found at load; the start stops on it."""

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {message}")


class Located:
    """A loaded YAML document plus the line of every mapping key and sequence item in it."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple, int]) -> None:
        self.path = path
        self.data = data
        self._lines = lines

    def line(self, loc: Sequence[Any]) -> int | None:
        """Line of the deepest known prefix of ``loc`` (a pydantic error location works)."""
        loc = tuple(loc)
        while loc:
            if loc in self._lines:
                return self._lines[loc]
            loc = loc[:-1]
        return self._lines.get((), None)

    def error(self, loc: Sequence[Any], message: str) -> ConfigError:
        return ConfigError(self.path, self.line(loc), message)


def _walk(node: yaml.Node, loc: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            lines[loc + (k,)] = key.start_mark.line + 1
            _walk(value, loc + (k,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _walk(item, loc + (i,), lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a second `when:` silently winning is a bug."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, text: str | None = None) -> Located:
    path = Path(path)
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text; save it as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(path, line, f"YAML syntax: {exc.problem or exc}") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return Located(path, data, lines)


def pydantic_error(doc: Located, exc: Any, prefix: Sequence[Any] = ()) -> ConfigError:
    """The first error of a pydantic ValidationError, placed at its line in ``doc``."""
    err = exc.errors()[0]
    loc = tuple(prefix) + tuple(x for x in err["loc"] if not (isinstance(x, str) and "[" in x))
    field = ".".join(str(x) for x in err["loc"]) or "(top)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see the documented fields)"
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return doc.error(loc, f"{field}: {msg}{extra}")
