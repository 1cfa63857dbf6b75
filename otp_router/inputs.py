"""Untrusted input: the one JSON decoder and the one text check every entry point uses.

The HTTP API, the Telegram webhook, the queue and the command line all take
text and JSON from outside. They decode it here, so each refuses the same
hostile forms the same way, with an :class:`~otp_router.errors.InputError`
(never a ``RecursionError``, a ``UnicodeError`` or a traceback):

* :func:`decode_json`: UTF-8 only (invalid bytes and escaped lone surrogates
  such as ``"\\ud800"`` are refused: they cannot be stored or sent anywhere),
  a size limit, a nesting limit, no repeated key in an object (the last value
  would otherwise win silently, e.g. a second ``phone``), and none of the
  non-standard constants ``NaN``/``Infinity``.
* :func:`check_text`: a string field that becomes a key, an id or a header
  (idempotency keys, verification ids): a string, within a length, with no
  control character (NUL included) and no lone surrogate.
* :func:`decode_form`: ``application/x-www-form-urlencoded`` bodies and query
  strings, strictly UTF-8, a bounded number of fields, and (for query strings)
  the **literal plus rule**: in a phone field, a ``+`` that starts the value and
  is followed by a digit 1-9 is a plus sign, not an encoded space. A URL typed
  by hand or by a no-code bot builder (``/start?phone=+4915123456789``) then
  means what its author meant; every other ``+`` is a space as form encoding
  says (``phone=+49+151+23456789`` is ``+49 151 23456789``), and ``%2B`` is
  always a plus. A value can only start with an encoded space when it was typed
  with a leading blank, and no country calling code starts with 0, so a
  national number typed after a blank (`` 0151…``) stays national.

Error messages never repeat the input's values: they may hold a phone number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote_plus

from otp_router.errors import InputError

__all__ = [
    "MAX_JSON_DEPTH",
    "JsonInputError",
    "check_text",
    "decode_form",
    "decode_json",
    "has_lone_surrogate",
    "is_text",
]

#: Deepest accepted nesting of arrays and objects. Our own documents have 3 levels.
MAX_JSON_DEPTH = 32

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 control characters, DEL, and lone surrogates.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class JsonInputError(InputError):
    """A JSON document was refused before anything was done with it.

    Args:
        message: What is wrong, without the document's values.
        reason: ``encoding`` (not UTF-8), ``too_large``, ``syntax``,
            ``too_deep``, ``duplicate_key`` or ``not_finite``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_text(value: str) -> bool:
    """True when ``value`` holds no control character (NUL included) and no lone surrogate."""
    return _NOT_TEXT.search(value) is None


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` cannot be encoded as UTF-8 (it holds a lone surrogate)."""
    return _LONE_SURROGATE.search(text) is not None


def _refuse_constant(name: str) -> NoReturn:
    raise JsonInputError(f"JSON must not contain {name}", reason="not_finite")


def _finite(parse: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """A ``parse_float`` that first refuses numbers beyond the float range (``1e999``)."""

    def parse_finite(text: str) -> Any:
        value = float(text)
        if math.isinf(value):
            # 1e999 is valid JSON syntax, but no number we accept is that large
            # (and Decimal would keep it, to overflow later in a metric or a sum).
            _refuse_constant("a number out of range")
        return value if parse is None else parse(text)

    return parse_finite


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JsonInputError(f"JSON object has a repeated key: {_shown(key)}", reason="duplicate_key")
        obj[key] = value
    return obj


def _shown(name: str) -> str:
    # Key names help callers fix typos; cap them so an error cannot echo a whole body.
    return repr(name[:40])


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth and lone surrogates, iteratively (a recursive walk is what we are guarding against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                raise JsonInputError("JSON text holds an unpaired surrogate escape", reason="encoding")
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise JsonInputError(f"JSON is nested deeper than {max_depth} levels", reason="too_deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if has_lone_surrogate(key):
                        raise JsonInputError(
                            "JSON text holds an unpaired surrogate escape", reason="encoding"
                        )
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def decode_json(
    data: bytes | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    parse_float: Callable[[str], Any] | None = None,
) -> Any:
    """Decode untrusted JSON strictly.

    Args:
        data: Raw bytes (must be UTF-8) or text (must not hold lone surrogates).
        max_bytes: Largest accepted document, in UTF-8 bytes.
        max_depth: Deepest accepted nesting of arrays and objects.
        parse_float: Passed to :func:`json.loads` (e.g. :class:`~decimal.Decimal`),
            after numbers beyond the float range are refused.

    Returns:
        The decoded value (any JSON type: callers check for the shape they need).

    Raises:
        JsonInputError: With a ``reason``; the message never quotes the document.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise JsonInputError(f"JSON is larger than {max_bytes} bytes", reason="too_large")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonInputError("JSON is not valid UTF-8", reason="encoding") from None
    elif isinstance(data, str):
        text = data
        # Four bytes per character at most: only long texts need the exact count.
        if len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise JsonInputError(f"JSON is larger than {max_bytes} bytes", reason="too_large")
        if has_lone_surrogate(text):
            raise JsonInputError("JSON is not valid UTF-8", reason="encoding")
    else:
        raise JsonInputError("JSON must be bytes or text", reason="syntax")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_repeats,
            parse_constant=_refuse_constant,
            parse_float=_finite(parse_float),
        )
    except RecursionError:
        raise JsonInputError(f"JSON is nested deeper than {max_depth} levels", reason="too_deep") from None
    except JsonInputError:
        raise
    except (ValueError, ArithmeticError):
        # The decoder's own message quotes the document (which may hold a phone number).
        raise JsonInputError("not valid JSON", reason="syntax") from None
    _check_tree(value, max_depth)
    return value


def check_text(value: object, *, name: str, max_length: int, min_length: int = 1) -> str:
    """Check a string that becomes an id, a key or part of a request.

    Args:
        value: What the caller gave.
        name: The field, for the message (e.g. ``"idempotency_key"``).
        max_length: Most characters.
        min_length: Fewest characters.

    Returns:
        ``value``, unchanged.

    Raises:
        InputError: Not a string, wrong length, or a control character or
            lone surrogate in it (the message never repeats the value).
    """
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string")
    if not min_length <= len(value) <= max_length:
        raise InputError(f"{name} must be {min_length}..{max_length} characters")
    if not is_text(value):
        raise InputError(f"{name} must be printable UTF-8 text (no control characters)")
    return value


#: Fields the literal plus rule of :func:`decode_form` applies to.
PHONE_FIELDS = frozenset({"phone"})
_LEADING_PLUS = re.compile(r"\+(?=[1-9])")


def _keep_leading_plus(pair: str, fields: Collection[str]) -> str:
    name, sep, value = pair.partition("=")
    if sep and unquote_plus(name, errors="strict") in fields:
        # Only the first character: form encoding's other "+" (spaces between digit groups) stay spaces.
        value = _LEADING_PLUS.sub("%2B", value, count=1) if value.startswith("+") else value
    return name + sep + value


def decode_form(
    data: bytes | str, *, max_fields: int, what: str = "request body", plus_fields: Collection[str] = ()
) -> list[tuple[str, str]]:
    """Decode ``application/x-www-form-urlencoded`` bytes (a body or a query string) strictly.

    Unlike ``urllib``'s and Starlette's lenient parsing, a percent-escape or a raw
    byte that is not UTF-8 is refused rather than replaced with U+FFFD (which
    would make two different malformed idempotency keys equal).

    Args:
        data: The raw bytes (or text) as received.
        max_fields: Most ``name=value`` pairs accepted.
        what: How the message names the input (``"query string"``).
        plus_fields: Fields the literal plus rule applies to (see the module
            docs); give :data:`PHONE_FIELDS` for query strings, nothing for bodies.

    Returns:
        The pairs in order, repeated names included (callers decide about repeats).

    Raises:
        InputError: Not UTF-8, or more than ``max_fields`` fields (the message
            never repeats the input).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        if plus_fields and "+" in text:
            text = "&".join(_keep_leading_plus(pair, plus_fields) for pair in text.split("&"))
        return parse_qsl(
            text, keep_blank_values=True, max_num_fields=max_fields, encoding="utf-8", errors="strict"
        )
    except ValueError:  # includes UnicodeDecodeError and too many fields
        raise InputError(f"{what} is not valid UTF-8 form data") from None
