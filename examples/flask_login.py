"""A Flask login backend that sends codes with otp-router's blocking facade.

Run it against the emulators as ``examples/README.md`` shows
(``flask --app examples.flask_login run``).

``create_app()`` is an application factory: importing the module reads no
environment; the :class:`~otp_router.SyncOtpRouter` (one per process, shared
by every request thread) is built when the app is.

* ``POST /login/start`` ``{"phone": "+4915…"}`` → 201 ``{"verification_id", "channel"}``;
  400 for a number that cannot be parsed, 429 when rate limited, 502 when no
  channel could send a code.
* ``POST /login/check`` ``{"verification_id", "code"}`` → 200 ``{"logged_in": true}``,
  or 401 with the check's status and the attempts left.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from otp_router import (
    AllProvidersFailed,
    InputError,
    InvalidCode,
    InvalidPhoneNumber,
    RateLimited,
    SyncOtpRouter,
)

Answer = tuple[dict[str, Any], int]


def _field(name: str) -> str:
    body = request.get_json(silent=True)
    value = body.get(name) if isinstance(body, dict) else request.form.get(name)
    return value if isinstance(value, str) else ""


def create_app(otp: SyncOtpRouter | None = None) -> Flask:
    """Build the app around ``otp`` (default: a ``SyncOtpRouter()`` reading ``OTP_ROUTER_*``)."""
    app = Flask(__name__)
    router = otp if otp is not None else SyncOtpRouter()

    @app.post("/login/start")
    def start_login() -> Answer:
        try:
            verification = router.start(_field("phone"))
        except InvalidPhoneNumber:
            return {"error": "That is not a phone number we can send to."}, 400
        except InputError:  # an unsupported country or number type (premium rate …)
            return {"error": "We cannot send codes to that number."}, 400
        except RateLimited as exc:
            return {"error": "Too many codes; try again later.", "retry_after": exc.retry_after}, 429
        except AllProvidersFailed:
            # Nothing is on its way: say so rather than show a code form that cannot work.
            return {"error": "We could not send a code right now; try again later."}, 502
        return {"verification_id": verification.id, "channel": verification.channel}, 201

    @app.post("/login/check")
    def check_login() -> Answer:
        try:
            result = router.check(_field("verification_id"), _field("code"))
        except InvalidCode:  # not digits, or the wrong length: no attempt was used
            return {"status": "invalid", "attempts_left": None}, 401
        except InputError:  # not a verification id at all
            return {"error": "Start again."}, 400
        if not result.valid:
            return {"status": result.status.value, "attempts_left": result.attempts_left}, 401
        # A real app would start the user's session here.
        return {"logged_in": True}, 200

    return app
