"""Keep phone numbers and the API token out of access logs."""

from __future__ import annotations

import logging

__all__ = ["RedactQuery"]


class RedactQuery(logging.Filter):
    """Strip query strings from uvicorn access log lines.

    ``GET /v1/verifications/start?phone=…&token=…`` would otherwise write a
    phone number and the API token to the access log. Install it with
    ``logging.getLogger("uvicorn.access").addFilter(RedactQuery())``, or run
    uvicorn with ``access_log=False``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the path argument of uvicorn's access record; never drops a record."""
        args = record.args
        # uvicorn logs (client, method, path_with_query, http_version, status).
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[redacted]", *args[3:])
        return True
