"""Types for request bodies that take JSON values as JSON has them.

pydantic's lax mode takes ``true`` and ``"3"`` for numbers, ``"yes"`` and ``1`` for
booleans, and numbers for date-times; the OpenAPI document says number, boolean and
date-time string, so a client (or schemathesis) holding the document to its word got
answers the document did not promise. These types keep what the document says.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator, Field, Strict


def _json_number(value: object) -> object:
    if isinstance(value, bool | str):
        raise ValueError("must be a number")
    return value


def _json_time(value: object) -> object:
    if not isinstance(value, str | datetime):
        raise ValueError("must be an ISO 8601 date-time string")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]
Integer = Annotated[int, BeforeValidator(_json_number)]
Timestamp = Annotated[datetime, BeforeValidator(_json_time)]
Boolean = Annotated[bool, Strict()]

# Bounds go before the validator: after it, pydantic writes them into the JSON schema
# as "ge"/"le" (keywords no client knows) instead of minimum/maximum.
PositiveInteger = Annotated[int, Field(ge=1), BeforeValidator(_json_number)]
NonNegativeInteger = Annotated[int, Field(ge=0), BeforeValidator(_json_number)]
TopK = Annotated[int, Field(ge=1, le=50), BeforeValidator(_json_number)]
"""How many memories a query returns."""
Fraction = Annotated[float, Field(ge=0, le=1), BeforeValidator(_json_number)]
