"""A FastAPI login backend that sends codes with otp-router.

Run it against the emulators as ``examples/README.md`` shows
(``uvicorn examples.fastapi_login:app``).

Importing this module reads no environment and opens nothing: the router is
opened by the lifespan when the server starts (``router_lifespan`` reads the
``OTP_ROUTER_*`` settings then) and reaches the endpoints through the
``get_otp_router`` dependency. The same router also serves otp-router's own
HTTP API under ``/otp`` (``include_router``), for tools that want it.

* ``POST /login/start`` ``{"phone": "+4915…"}`` → 201 ``{"verification_id", "channel"}``;
  400 for a number that cannot be parsed, 429 (``Retry-After``) when rate
  limited, 502 when no channel could send a code.
* ``POST /login/check`` ``{"verification_id", "code"}`` → 200 ``{"logged_in": true}``,
  or 401 with the check's status (``invalid``, ``expired`` …) and the attempts left.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from otp_router import (
    AllProvidersFailed,
    InputError,
    InvalidCode,
    InvalidPhoneNumber,
    OtpRouter,
    RateLimited,
)
from otp_router.webapp import router_lifespan
from otp_router.webapp.api import get_otp_router, verification_router

app = FastAPI(title="Example login", lifespan=router_lifespan)
app.include_router(verification_router(), prefix="/otp")

Otp = Annotated[OtpRouter, Depends(get_otp_router)]


class StartLogin(BaseModel):
    phone: str


class Started(BaseModel):
    verification_id: str
    channel: str | None


class CheckLogin(BaseModel):
    verification_id: str
    code: str


class LoggedIn(BaseModel):
    logged_in: bool


@app.post("/login/start", status_code=201)
async def start_login(body: StartLogin, otp: Otp) -> Started:
    """Send a login code to the number."""
    try:
        verification = await otp.start(body.phone)
    except InvalidPhoneNumber:
        raise HTTPException(400, "That is not a phone number we can send to.") from None
    except InputError:  # an unsupported country or number type (premium rate …)
        raise HTTPException(400, "We cannot send codes to that number.") from None
    except RateLimited as exc:
        retry = {"Retry-After": str(int(exc.retry_after or 60))}
        raise HTTPException(429, "Too many codes; try again later.", headers=retry) from None
    except AllProvidersFailed:
        # Nothing is on its way: say so rather than show a code form that cannot work.
        raise HTTPException(502, "We could not send a code right now; try again later.") from None
    return Started(verification_id=verification.id, channel=verification.channel)


@app.post("/login/check")
async def check_login(body: CheckLogin, otp: Otp) -> LoggedIn:
    """Check the code the user typed."""
    try:
        result = await otp.check(body.verification_id, body.code)
    except InvalidCode:  # not digits, or the wrong length: no attempt was used
        raise HTTPException(401, {"status": "invalid", "attempts_left": None}) from None
    except InputError:  # not a verification id at all
        raise HTTPException(400, "Start again.") from None
    if not result.valid:
        raise HTTPException(401, {"status": result.status.value, "attempts_left": result.attempts_left})
    # A real app would start the user's session here.
    return LoggedIn(logged_in=True)
