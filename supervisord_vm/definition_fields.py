"""The building blocks of definition parsing: one bad field as an error, TOML values described
for people, and typed field readers (pure). Shared by definition.py and definition_devices.py."""

from __future__ import annotations

import difflib
from pathlib import PurePosixPath

from supervisord_vm.errors import InvalidDefinition


class FieldError(Exception):
    """One bad field; collected by parse_definition into one InvalidDefinition."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field '{field}': {reason}")


def show(value: object) -> str:
    """Describe a TOML value for an error message, in TOML terms where it matters."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def int_field(
    table: dict[str, object], key: str, *, low: int, high: int, unit: str, default: int
) -> int:
    value = table.get(key, default)
    # bool is an int subclass in Python, but `memory = true` is not a size.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(
            key, f"must be an integer from {low} to {high} ({unit}), got {show(value)}"
        )
    return value


def bool_field(table: dict[str, object], key: str, default: bool, field: str | None = None) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise FieldError(field or key, f"must be true or false, got {show(value)}")
    return value


def str_field(table: dict[str, object], key: str, default: str, field: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise FieldError(field or key, f"must be a string, got {show(value)}")
    return value


def absolute_path(table: dict[str, object], key: str, default: str | None, field: str) -> str:
    if key not in table and default is None:
        raise FieldError(field, "is required")
    value = table.get(key, default)
    if not isinstance(value, str):
        raise FieldError(field, f"must be an absolute path (a string), got {show(value)}")
    if "\0" in value:
        raise FieldError(field, "must not contain NUL characters")
    if not PurePosixPath(value).is_absolute():
        raise FieldError(field, f"must be an absolute path, got {show(value)}")
    return value


# --- writing ---------------------------------------------------------------------------------

_SHORT_ESCAPES = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}


def toml_string(value: str) -> str:
    """A TOML basic string for ``value``; unprintable characters become \\u escapes."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif 0xD800 <= code <= 0xDFFF:
            # Not a Unicode scalar value: neither UTF-8 nor TOML can carry it.
            raise InvalidDefinition(f"cannot write {value!r} as TOML: it contains a lone surrogate")
        elif char.isprintable() or char == " ":
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    out.append('"')
    return "".join(out)


def toml_bool(value: bool) -> str:
    return "true" if value else "false"
