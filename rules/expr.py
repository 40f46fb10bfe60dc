"""The small, safe expression grammar of rule files.

Rule files are data: a condition such as ``value >= params.level1_lel`` or
``sensor.lives_alone and not sensor.commercial`` is tokenised and parsed here into a tiny tree and
evaluated by walking it. Nothing is handed to ``eval``; names resolve only through the lookup the
caller gives, so a rule can read a reading's quantities, its pack's parameters and the registry's
facts about the sensor, and nothing else.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER | 'text' | "text" | true | false | NAME ("." NAME)* | "(" expr ")"
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<str>'[^']*'|"[^"]*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\))
""", re.VERBOSE)

COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
           "==": operator.eq, "!=": operator.ne}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_KEYWORDS = {"and", "or", "not", "true", "false"}


class ExprError(ValueError):
    """A malformed expression; ``column`` is 1-based within the expression text."""

    def __init__(self, text: str, column: int, message: str) -> None:
        self.text, self.column, self.message = text, column, message
        super().__init__(f"{message} at column {column} of {text!r}")


@dataclass(frozen=True, slots=True)
class Node:
    op: str                 # num str bool name not and or cmp bin neg
    args: tuple[Any, ...]

    def names(self) -> set[str]:
        if self.op == "name":
            return {self.args[0]}
        out: set[str] = set()
        for a in self.args:
            if isinstance(a, Node):
                out |= a.names()
        return out


def parse(text: str) -> Node:
    if not isinstance(text, str) or not text.strip():
        raise ExprError(str(text), 1, "empty expression")
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(text, pos + 1, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind != "ws":
            tokens.append((kind, m.group(), pos + 1))  # type: ignore[arg-type]  # str: every _TOKEN branch is named
        pos = m.end()
    parser = _Parser(text, tokens)
    node = parser.or_()
    if parser.i < len(tokens):
        raise ExprError(text, tokens[parser.i][2], f"unexpected {tokens[parser.i][1]!r}")
    return node


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str, int]]) -> None:
        self.text, self.tokens, self.i = text, tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            raise ExprError(self.text, len(self.text) + 1, "expression ends too early")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def or_(self) -> Node:
        node = self.and_()
        while self.peek() == "or":
            self.take()
            node = Node("or", (node, self.and_()))
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.peek() == "and":
            self.take()
            node = Node("and", (node, self.not_()))
        return node

    def not_(self) -> Node:
        if self.peek() == "not":
            self.take()
            return Node("not", (self.not_(),))
        return self.compare()

    def compare(self) -> Node:
        node = self.sum()
        if self.peek() in COMPARE:
            op = self.take()[1]
            node = Node("cmp", (op, node, self.sum()))
            if self.peek() in COMPARE:
                raise ExprError(self.text, self.tokens[self.i][2],
                                "chained comparison; join two comparisons with 'and'")
        return node

    def sum(self) -> Node:
        node = self.product()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            node = Node("bin", (op, node, self.product()))
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            node = Node("bin", (op, node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            return Node("neg", (self.unary(),))
        return self.atom()

    def atom(self) -> Node:
        kind, tok, col = self.take()
        if kind == "num":
            return Node("num", (float(tok),))
        if kind == "str":
            return Node("str", (tok[1:-1],))
        if kind == "name":
            if tok in ("true", "false"):
                return Node("bool", (tok == "true",))
            if tok in _KEYWORDS:
                raise ExprError(self.text, col, f"{tok!r} needs something before it")
            return Node("name", (tok,))
        if tok == "(":
            node = self.or_()
            if self.peek() != ")":
                raise ExprError(self.text, col, "unclosed '('")
            self.take()
            return node
        raise ExprError(self.text, col, f"unexpected {tok!r}")


def evaluate(node: Node, lookup: Callable[[str], Any]) -> Any:
    """Evaluate ``node``; ``lookup(name)`` gives a name's value or raises KeyError."""
    op, args = node.op, node.args
    if op in ("num", "str", "bool"):
        return args[0]
    if op == "name":
        return lookup(args[0])
    if op == "not":
        return not evaluate(args[0], lookup)
    if op == "and":
        return bool(evaluate(args[0], lookup)) and bool(evaluate(args[1], lookup))
    if op == "or":
        return bool(evaluate(args[0], lookup)) or bool(evaluate(args[1], lookup))
    if op == "neg":
        return -_number(evaluate(args[0], lookup))
    if op == "bin":
        a, b = _number(evaluate(args[1], lookup)), _number(evaluate(args[2], lookup))
        if args[0] == "/" and b == 0:
            raise ZeroDivisionError("division by zero")
        return _ARITH[args[0]](a, b)
    if op == "cmp":
        a, b = evaluate(args[1], lookup), evaluate(args[2], lookup)
        if args[0] not in ("==", "!=") and not (_is_num(a) and _is_num(b)):
            raise TypeError(f"cannot order {a!r} and {b!r}")
        return COMPARE[args[0]](a, b)
    raise AssertionError(op)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(x: Any) -> float:
    if not _is_num(x):
        raise TypeError(f"{x!r} is not a number")
    return x


def render(node: Node) -> str:
    """Canonical text of an expression (for messages and `cityops rules check`)."""
    op, args = node.op, node.args
    if op == "num":
        v = args[0]
        return str(int(v)) if v == int(v) else repr(v)
    if op == "str":
        return repr(args[0])
    if op == "bool":
        return "true" if args[0] else "false"
    if op == "name":
        return args[0]
    if op == "not":
        return f"not {render(args[0])}"
    if op in ("and", "or"):
        return f"({render(args[0])} {op} {render(args[1])})"
    if op == "neg":
        return f"-{render(args[0])}"
    if op == "bin":
        return f"({render(args[1])} {args[0]} {render(args[2])})"
    return f"{render(args[1])} {args[0]} {render(args[2])}"
