"""The safe expression grammar of rule files (rules.expr): what it means, what it refuses, and
that nothing in a rule file can reach Python."""

from __future__ import annotations

import pytest

from rules.expr import ExprError, Node, evaluate, parse, render

FACTS = {
    "value": 30.0,
    "battery": 15.0,
    "params.level1_lel": 20.0,
    "params.level2_lel": 50.0,
    "sensor.lives_alone": True,
    "sensor.commercial": False,
    "sensor.owner": "独居老人 王秀英",
    "sensor.warning_level": 4.5,
    "place.district": "510104",
}


def lookup(name: str):
    """Like the compiler's lookups: known names only, KeyError for anything else."""
    return FACTS[name]


def ev(text: str):
    return evaluate(parse(text), lookup)


# ---- meaning ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 - 4 - 3", 3),                 # left-associative
    ("8 / 4 / 2", 1),
    ("2 * 3 + 4 * 5", 26),
    ("-2 * 3", -6),
    ("--2", 2),
    ("-(1 + 2)", -3),
    ("7 / 2", 3.5),
    ("1.5e2 + .5", 150.5),
    ("2.", 2),
    ("value - params.level1_lel", 10),
])
def test_arithmetic_and_precedence(text, expected):
    assert ev(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("value >= params.level1_lel", True),
    ("value >= params.level2_lel", False),
    ("value > 30", False),
    ("value >= 30", True),
    ("value < 30", False),
    ("value <= 30", True),
    ("value == 30", True),
    ("value != 30", False),
    ("1 + 2 >= 3", True),               # arithmetic binds tighter than comparison
    ("value >= sensor.warning_level * 2 + 20", True),
    ("20 <= value", True),
])
def test_comparisons(text, expected):
    assert ev(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("true", True),
    ("false", False),
    ("not false", True),
    ("not not true", True),
    ("true and false", False),
    ("true or false", True),
    ("false or false", False),
    ("true or true and false", True),         # and binds tighter than or
    ("(true or true) and false", False),
    ("not true and false", False),            # not binds tighter than and
    ("not (true and false)", True),
    ("not 1 > 2", True),                      # not applies to the whole comparison
    ("sensor.lives_alone and not sensor.commercial", True),
    ("sensor.commercial or battery <= 20", True),
    ("value >= 20 and value < 50", True),
])
def test_boolean_logic(text, expected):
    assert ev(text) is expected


def test_and_or_not_give_booleans_not_operands():
    assert ev("value and battery") is True
    assert ev("0 or 0") is False
    assert ev("not 0") is True


@pytest.mark.parametrize("text, expected", [
    ("'abc'", "abc"),
    ('"abc"', "abc"),
    ("'独居老人'", "独居老人"),
    ("''", ""),
    ("sensor.owner == '独居老人 王秀英'", True),
    ('place.district == "510104"', True),
    ("place.district != '510105'", True),
    ("'a' == 1", False),                # equality across types is allowed, and false
    ("'it''s'", None),                  # no escapes: two adjacent strings are two tokens
])
def test_strings(text, expected):
    if expected is None:
        with pytest.raises(ExprError):
            parse(text)
    else:
        assert ev(text) == expected


def test_string_content_is_inert():
    # braces, quotes of the other kind and Python syntax inside a string are just characters
    assert ev("'{0.__class__}'") == "{0.__class__}"
    assert ev("\"__import__('os')\"") == "__import__('os')"


def test_dotted_names_resolve_whole_through_the_lookup():
    asked: list[str] = []

    def recording(name: str):
        asked.append(name)
        return 1.0

    node = parse("params.a + sensor.b.c * x")
    assert node.names() == {"params.a", "sensor.b.c", "x"}
    assert evaluate(node, recording) == 2.0
    assert sorted(asked) == ["params.a", "sensor.b.c", "x"]


def test_names_of_a_literal_expression_are_empty():
    assert parse("1 + 2 >= 3 and 'x' == 'x'").names() == set()


@pytest.mark.parametrize("text", [
    "value >= params.level1_lel",
    "not sensor.lives_alone or (value > 3 and battery <= 20)",
    "'a' == \"b\"",
    "true and false",
    "-value * 3 / 4 - 5",
    "(1 + 2) * 3",
    "10 - (4 - 3)",
    "-(value - 1)",
    "value >= (params.level1_lel + params.level2_lel) / 2",
])
def test_render_parses_back_to_the_same_tree(text):
    """render() is the canonical text of an expression: it must mean the same thing."""
    node = parse(text)
    again = parse(render(node))
    assert again == node
    assert ev(render(node)) == ev(text)


# ---- errors, with the column of the mistake ----------------------------------------------

@pytest.mark.parametrize("text, column, message", [
    ("(value + 1", 1, "unclosed '('"),
    ("((value) + 1 >= 3", 1, "unclosed '('"),
    ("value >= (1 + 2", 10, "unclosed '('"),
    ("1 < value < 3", 11, "chained comparison"),
    ("value == 1 == true", 12, "chained comparison"),
    ("value @ 3", 7, "unexpected character '@'"),
    ("value >= 3 ; 1", 12, "unexpected character ';'"),
    ("value = 3", 7, "unexpected character '='"),
    ("value[0]", 6, "unexpected character '['"),
    ("a, b", 2, "unexpected character ','"),
    ("value 3", 7, "unexpected '3'"),
    ("value >= 3 battery", 12, "unexpected 'battery'"),
    ("(1) (2)", 5, "unexpected '('"),
    ("and value", 1, "'and' needs something before it"),
    ("value or or battery", 10, "'or' needs something before it"),
    ("value and not or 1", 15, "'or' needs something before it"),
    ("value and", 10, "expression ends too early"),
    ("not", 4, "expression ends too early"),
    ("1 +", 4, "expression ends too early"),
    ("value >= ", 10, "expression ends too early"),
    (")", 1, "unexpected ')'"),
    ("'unterminated", 1, "unexpected character \"'\""),
    ("a..b", 2, "unexpected character '.'"),
    ("a.1", 2, "unexpected '.1'"),
])
def test_parse_errors_name_the_column(text, column, message):
    with pytest.raises(ExprError) as info:
        parse(text)
    err = info.value
    assert err.column == column
    assert message in err.message
    assert err.text == text
    assert f"at column {column} of {text!r}" in str(err)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_expression(text):
    with pytest.raises(ExprError, match="empty expression") as info:
        parse(text)
    assert info.value.column == 1


def test_expr_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse("value >")


# ---- evaluation errors ----------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "sensor.owner < 3",
    "3 >= sensor.owner",
    "'a' < 'b'",                 # strings are not ordered either
    "sensor.lives_alone > 0",    # a boolean is not a number
    "true <= 1",
])
def test_ordering_non_numbers_is_a_type_error(text):
    with pytest.raises(TypeError, match="cannot order"):
        ev(text)


@pytest.mark.parametrize("text", [
    "sensor.owner + 1",
    "1 - 'a'",
    "-sensor.owner",
    "true * 2",
    "-sensor.lives_alone",
])
def test_arithmetic_on_non_numbers_is_a_type_error(text):
    with pytest.raises(TypeError, match="is not a number"):
        ev(text)


def test_division_by_zero():
    with pytest.raises(ZeroDivisionError):
        ev("value / (battery - 15)")


def test_unknown_name_is_a_key_error_from_the_lookup():
    with pytest.raises(KeyError):
        ev("params.nope >= 1")


# ---- nothing can be executed -----------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('true')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd')",
    "exec('1')",
    "lambda: 1",
    "value if true else 0",
    "[x for x in value]",
    "value.__class__()",
    "f'{value}'",
    "value ** 2",
    "value // 2",
    "value % 2",
    "sensor['owner']",
    "{1: 2}",
    "`id`",
    "value; 1",
])
def test_python_syntax_does_not_parse(text):
    with pytest.raises(ExprError):
        parse(text)


@pytest.mark.parametrize("text", [
    "value.__class__",
    "value.__class__.__mro__",
    "__builtins__",
    "__import__",
    "params.__dict__",
    "sensor.__class__.__subclasses__",
])
def test_dunder_names_are_only_names_resolved_by_the_lookup(text):
    node = parse(text)
    assert node == Node("name", (text,))
    with pytest.raises(KeyError) as info:
        evaluate(node, lookup)
    assert info.value.args == (text,)


def test_a_name_is_never_looked_up_anywhere_but_the_lookup():
    # even names that exist in this module or in builtins are unknown to a rule
    for text in ("lookup", "FACTS", "print", "len", "evaluate"):
        with pytest.raises(KeyError):
            ev(text)
