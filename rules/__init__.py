"""The rule language (schema, expressions, compiler, evaluators) and the built-in packs."""
