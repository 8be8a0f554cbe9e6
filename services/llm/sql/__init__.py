"""Text-to-SQL: a question in plain language becomes one read-only SELECT.

``schema`` reads a schema (DDL text, a SQLite file, a PostgreSQL catalog); ``grammar``
turns it into GBNF that only spells SELECTs over its tables and columns; ``check``
parses what the model wrote with sqlglot, checks it against the schema and caps its
rows; ``databases`` runs it read-only; ``service`` ties them to the model.
"""
