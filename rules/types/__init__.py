"""The rule types, one module each; importing this package registers them (``base.TYPES``)
and makes ``rules.schema.Rule``, the union of their schemas a pack's ``rules:`` takes.

A new rule type: a module here that defines its schema, its ``RuleType`` and its evaluator and
calls ``register``, plus its name in ``MODULES`` (the order errors list the types in)."""

from importlib import import_module
from typing import Annotated, Union

from pydantic import Field

from rules import schema
from rules.types.base import TYPES

MODULES = ("threshold", "rate", "window", "absence", "events", "correlation", "stuck")
for _name in MODULES:
    import_module(f"rules.types.{_name}")

schema.Rule = Annotated[Union[tuple(t.schema for t in TYPES.values())],  # noqa: UP007
                        Field(discriminator="type")]
schema.Pack.model_rebuild(force=True)
