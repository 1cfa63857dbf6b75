"""Structured logs: one event name and its fields per line, as JSON or logfmt.

Every line otp-router logs is an *event*: a short, stable name
(``deadline_loop_store_error``, ``dead_letter``) and fields. Context that
many lines share (verification id, channel, provider, region) is bound once
with :func:`bind` and added to every line logged inside it, including lines of
tasks started there (it lives in a :mod:`contextvars` variable).

Rendering is chosen by ``OTP_ROUTER_LOG_FORMAT``:

``json``
    ``{"ts": "2026-01-01T12:00:00.000Z", "level": "info", "logger": "otp_router.worker",
    "event": "processed", "id": "1-0", "verification": "v_…", "ms": 3.1}``
``logfmt``
    ``ts=2026-01-01T12:00:00.000Z level=info logger=otp_router.worker event=processed id=1-0 …``
``text`` (default)
    the classic ``asctime level logger message`` line, whose message is the
    event in logfmt.

Phone numbers, codes and secrets are never fields: callers pass ids, types
and counts only (``tests/test_logs.py`` scans the output of a run for them).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["FORMATS", "StructuredFormatter", "bind", "configure_logging", "event", "logfmt"]

#: The values ``OTP_ROUTER_LOG_FORMAT`` accepts.
FORMATS = ("text", "json", "logfmt")

_NOTHING: Mapping[str, Any] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "otp_router_log_context", default=_NOTHING
)
_EVENT = "otp_event"
_FIELDS = "otp_fields"


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every event logged inside the block (and in tasks started there).

    None values are left out; inner binds win over outer ones.
    """
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bound() -> Mapping[str, Any]:
    """The fields bound at this point."""
    return _CONTEXT.get()


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def logfmt(name: str, fields: Mapping[str, Any]) -> str:
    """``event=<name> key=value …``: floats with one decimal, None left out, odd text quoted."""
    parts = [f"event={_value(name)}"]
    parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def event(logger: logging.Logger, level: int, name: str, /, *, exc_info: bool = False, **fields: Any) -> None:
    """Log one event with its fields (and the bound context).

    The record's message is the logfmt line, so plain handlers (and pytest's
    ``caplog``) show the same as :class:`StructuredFormatter` with ``logfmt``.
    """
    if not logger.isEnabledFor(level):
        return
    merged = {**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}}
    logger.log(level, "%s", logfmt(name, merged), exc_info=exc_info, extra={_EVENT: name, _FIELDS: merged})


class StructuredFormatter(logging.Formatter):
    """Renders records as one JSON object or one logfmt line.

    Records from :func:`event` keep their event name and fields; any other
    record (a library's, or a plain ``log.info("…")``) becomes the event
    ``message`` with its text in ``msg``.

    Args:
        style: ``"json"`` or ``"logfmt"``.
    """

    def __init__(self, style: str = "json") -> None:
        super().__init__()
        if style not in ("json", "logfmt"):
            raise ValueError("style must be json or logfmt")
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, _EVENT, None)
        fields: dict[str, Any] = dict(getattr(record, _FIELDS, None) or {})
        if name is None:
            name = "message"
            fields = {**_CONTEXT.get(), "msg": record.getMessage()}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": name,
        }
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: an exception's text may quote input.
            fields["exc_type"] = record.exc_info[0].__name__
        body = {**head, **{k: v for k, v in fields.items() if k not in head}}
        if self.style == "json":
            return json.dumps(body, default=str, ensure_ascii=False)
        return " ".join(f"{key}={_value(value)}" for key, value in body.items() if value is not None)


def configure_logging(level: str, style: str = "text") -> None:
    """Log to stderr at ``level`` in ``style`` unless the application configured logging already.

    Args:
        level: ``DEBUG`` … ``CRITICAL``.
        style: One of :data:`FORMATS`.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if style == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(StructuredFormatter(style))
    root.addHandler(handler)
    root.setLevel(level.upper())
