"""The API's request body parser (DRF's DEFAULT_PARSER_CLASSES).

A module of its own, importing no DRF view: DRF's settings import it lazily, the first time
any view class is built, and a parser living next to views would be half-imported then.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.parsers import JSONParser as DRFJSONParser

from tenancy.storable import MAX_JSON_DEPTH, input_problem, json_depth_exceeds


class JSONParser(DRFJSONParser):
    """DRF's JSON parser, refusing absurdly nested documents with a 400 instead of a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
        if json_depth_exceeds(data):
            raise exceptions.ParseError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        # What the database could not store as sent (NUL, lone surrogates, non-finite numbers)
        # is refused here, for every JSON body, rather than repaired behind the client's back.
        problem = input_problem(data)
        if problem is not None:
            raise exceptions.ValidationError({problem[0]: [problem[1]]})
        return data
