"""A JSON schema that exercises a grammar's corners (a bounded string, an enum with quotes, a bounded integer, a
boolean, a bounded array, no other properties), shared by the constrained-decoding tests of both engines."""

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": ["red", "green", 'blue "sky"']},
        "count": {"type": "integer", "minimum": -50, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "color", "count", "ok"],
    "additionalProperties": False,
}
