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


# libyaml's parser when present (10-20x faster on a city-sized registry), same safe constructor.
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_Base):  # type: ignore[misc, valid-type]
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
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()        # composed once: lines from it, data from it
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(path, exc) from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return Located(path, data, lines)


def _syntax_error(path: Path, exc: yaml.MarkedYAMLError) -> ConfigError:
    """The line to look at: for an unclosed quote or bracket it is where it opened (the
    context), not where the parser gave up, which can be many lines later."""
    mark, problem = exc.problem_mark, exc.problem or str(exc)
    opened = exc.context_mark is not None and (
        isinstance(exc, yaml.scanner.ScannerError) or "flow" in (exc.context or ""))
    if opened:
        assert exc.context_mark is not None
        mark = exc.context_mark
        at = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        problem = f"{exc.context}: {problem}{at}"
    return ConfigError(path, mark.line + 1 if mark else None, f"YAML syntax: {problem}")


def _data_path(data: Any, loc: Sequence[Any]) -> tuple:
    """The part of a pydantic error location that exists in the data: drops union tags such as
    the rule `type` pydantic puts in the path, keeps keys and indexes."""
    out: list[Any] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            out.append(item)
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            out.append(item)
            node = node[item]
        elif isinstance(node, dict) and isinstance(item, str) and not out[-1:] == [item]:
            # a tag or a missing key: a missing key's error belongs to its mapping's line
            continue
    return tuple(out)


def pydantic_error(doc: Located, exc: Any, prefix: Sequence[Any] = ()) -> ConfigError:
    """A pydantic ValidationError as ``file:line: field: what is wrong``. An unknown field is
    reported first: it is usually the typo that also makes a required field look missing."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    root = doc.data
    for p in prefix:
        root = root[p]
    loc = tuple(prefix) + _data_path(root, err["loc"])
    if err["type"] == "union_tag_invalid":          # point at the tag itself: `type: treshold`
        tag = err.get("ctx", {}).get("discriminator", "").strip("'")
        loc += (tag,) if tag else ()
    field = ".".join(str(x) for x in _data_path(root, err["loc"]) + _missing(root, err)) or "(top)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling against the documented fields)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return doc.error(loc, f"{field}: {msg}{extra}")


def _missing(root: Any, err: dict) -> tuple:
    return (err["loc"][-1],) if err["type"] == "missing" and err["loc"] else ()
