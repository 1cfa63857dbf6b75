"""The verification HTTP API (``/v1/verifications``) as a FastAPI ``APIRouter``: start, check, get,
cancel, resend.

**Three ways to serve it.**

* In your own FastAPI app: ``app.include_router(verification_router())``. The
  routes find the :class:`~otp_router.router.OtpRouter` through the
  :func:`get_otp_router` dependency, which reads the lifespan state
  (``yield {"otp_router": router}``, see :func:`otp_router.webapp.router_lifespan`)
  or ``app.state.otp_router``. Importing this module reads no environment and
  opens nothing; override the dependency
  (``app.dependency_overrides[get_otp_router] = …``) or pass a router to bind
  one directly.
* As the worker's own server: :func:`otp_router.webapp.create_app` includes
  this router with the webhooks, ``/metrics``, ``/healthz`` and ``/openapi.json``.
* In Starlette or Django: mount that ASGI app (see the README).

**Authentication.** Every route needs ``OTP_ROUTER_API_TOKEN``, sent as
``Authorization: Bearer <token>`` or as a ``?token=<token>`` query parameter,
compared in constant time. The query form exists for no-code bot builders
that can only call a URL; its cost is that the token then appears wherever
URLs are kept (proxy and access logs, browser history), so prefer the header
and rotate a token that was used in URLs. When ``OTP_ROUTER_API_TOKEN`` is
unset the API is disabled: every ``/v1`` route answers 404 ``not_found``, so
an unconfigured deployment exposes nothing that can send messages.

**Input.** ``POST`` bodies may be JSON objects or
``application/x-www-form-urlencoded``; ``start`` and ``check`` are also
available as ``GET`` with query parameters. Every field is a string; an
unknown, repeated or non-string field is a 400 that names it, so a typo never
silently drops an idempotency key. Optional fields given as empty strings
count as absent (what form builders send for an empty input). Bodies and
query strings are read by this module, not by FastAPI: JSON through the strict
:func:`otp_router.inputs.decode_json` (a repeated key, bytes that are not
UTF-8 or absurd nesting are a 400, where a lenient parser lets the last value
win), forms and query strings through :func:`otp_router.inputs.decode_form`
(whose literal plus rule makes ``?phone=+4915…`` a plus, not a space). The
fields are then checked against the Pydantic models of
:mod:`otp_router.webapp.schemas`, which also document them in the OpenAPI
document (``openapi_extra``), so the document and the checks have one source.

**Errors.** Every error is a JSON body ``{"error": {"code", "message"}}`` with
the status of :data:`otp_router.webapp.common.ERROR_STATUS`. The routes use
:class:`JsonErrorRoute`, which makes that conversion itself, so the shape is
the same inside an app that installs no exception handler of ours.

**Privacy.** The phone number is never repeated in a response, an error or a
log line. With the ``GET`` variant the number travels in the URL: run the
server with access logs off or filtered (:class:`~otp_router.webapp.RedactQuery`).
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at run
# time, and the Annotated aliases of verification_router() are local to it.
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.routing import NoMatchFound

from otp_router.errors import ConfigError, OtpRouterError
from otp_router.inputs import PHONE_FIELDS, JsonInputError, decode_form, decode_json
from otp_router.logs import event as log_event
from otp_router.router import OtpRouter
from otp_router.webapp import schemas
from otp_router.webapp.common import ApiError, error_response, json_error, read_body

__all__ = [
    "API_BODY_LIMIT",
    "STATE_KEY",
    "JsonErrorRoute",
    "RouterDependency",
    "get_otp_router",
    "router_dependency",
    "verification_router",
]

log = logging.getLogger("otp_router.webapp")

#: Largest accepted API request body.
API_BODY_LIMIT = 16 * 1024
_MAX_FIELDS = 20
#: Name of the router in the lifespan state and in ``app.state``.
STATE_KEY = "otp_router"

#: A FastAPI dependency that returns the router to use for a request.
RouterDependency = Callable[..., OtpRouter | Awaitable[OtpRouter]]

_M = TypeVar("_M", bound=BaseModel)


# --- the router behind the routes ------------------------------------------------------


def get_otp_router(request: Request) -> OtpRouter:
    """The :class:`OtpRouter` for this request: lifespan state first, then ``app.state``.

    Yield ``{"otp_router": router}`` from the application's lifespan (or set
    ``app.state.otp_router``). Override it with ``app.dependency_overrides``.

    Raises:
        ConfigError: Neither holds a router (a programming error: the request
            gets a 500 ``internal_error``, the log says what is missing).
    """
    router = getattr(request.state, STATE_KEY, None)
    if router is None:
        router = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(router, OtpRouter):
        log_event(
            log,
            logging.ERROR,
            "no_router_for_request",
            hint=f"yield {{{STATE_KEY!r}: router}} from the lifespan",
        )
        raise ConfigError(f"no OtpRouter in the lifespan state or app.state ({STATE_KEY!r})")
    return router


def router_dependency(router: OtpRouter | None) -> RouterDependency:
    """:func:`get_otp_router`, or a dependency that always returns ``router`` when one is given."""
    if router is None:
        return get_otp_router
    bound = router

    def the_router() -> OtpRouter:
        return bound

    return the_router


# --- errors ----------------------------------------------------------------------------


def _validation_message(errors: Iterable[Any]) -> str:
    # Field names and Pydantic's messages only: the "input" member may hold a phone number.
    parts = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "request"
        parts.append(f"{where[:40]!r}: {err.get('msg', 'invalid')}")
    return "invalid field: " + "; ".join(parts[:5])


class JsonErrorRoute(APIRoute):
    """A route whose errors (ours, the router's, FastAPI's validation) become JSON error bodies.

    A route class, not exception handlers: handlers belong to the application,
    and an ``APIRouter`` included in someone else's app brings none.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler (dependencies included) in the error conversion."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, OtpRouterError) as exc:
                return error_response(exc)
            except RequestValidationError as exc:
                return json_error(400, "bad_request", _validation_message(exc.errors()))

        return handle


# --- reading input -----------------------------------------------------------------------


def _names(names: Iterable[str]) -> str:
    # Field names are echoed so callers can fix typos; cap them so a body
    # cannot turn an error message into an echo of arbitrary input.
    return ", ".join(sorted(repr(name[:40]) for name in set(names)))


def _pairs_to_fields(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if name in fields:
            repeated.add(name)
        fields[name] = value
    if repeated:
        raise ApiError(400, "bad_request", f"field given more than once: {_names(repeated)}")
    return fields


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _body_fields(request: Request) -> dict[str, Any]:
    body = await read_body(request, API_BODY_LIMIT)
    if not body.strip():
        return {}
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        try:
            # Strict: UTF-8 only, bounded depth, a repeated key is refused (never "last one wins").
            data = decode_json(body, max_bytes=API_BODY_LIMIT)
        except JsonInputError as exc:
            raise ApiError(400, "bad_request", f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "request body must be a JSON object")
        return data
    if media == "application/x-www-form-urlencoded":
        return _pairs_to_fields(decode_form(body, max_fields=_MAX_FIELDS, what="request body"))
    raise ApiError(
        415,
        "unsupported_media_type",
        "send application/json or application/x-www-form-urlencoded",
    )


async def read_input(request: Request, model: type[_M]) -> _M:
    """The request's fields from the query (``GET``) or the body (``POST``), checked against ``model``.

    Absent optional fields and empty optional strings are None.

    Raises:
        ApiError: 400 for unknown, repeated, non-string or missing fields and
            unparseable bodies; 413 for large bodies; 415 for other content types.
        InputError: A query string or form that is not UTF-8 (a 400 too).
    """
    query = [
        (name, value)
        for name, value in decode_form(
            request.scope["query_string"],
            max_fields=_MAX_FIELDS,
            what="query string",
            plus_fields=PHONE_FIELDS,
        )
        if name != "token"
    ]
    if request.method == "GET":
        raw = _pairs_to_fields(query)
    else:
        if query:
            raise ApiError(400, "bad_request", f"unexpected query parameter: {_names(n for n, _ in query)}")
        raw = await _body_fields(request)
    allowed = model.model_fields
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field: {_names(unknown)}")
    fields: dict[str, str | None] = {}
    for name, info in allowed.items():
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "bad_request", f"field {name!r} must be a string")
        if info.is_required() and value is None:
            raise ApiError(400, "bad_request", f"missing field: {name!r}")
        fields[name] = value if (value or info.is_required()) else None
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(400, "bad_request", _validation_message(exc.errors())) from None


# --- authentication ----------------------------------------------------------------------

# Declared for the OpenAPI document (two alternative security schemes); the
# check itself is authorize()'s, on the raw header and the strictly parsed query.
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="OTP_ROUTER_API_TOKEN.")
_query_token = APIKeyQuery(
    name="token",
    auto_error=False,
    scheme_name="queryToken",
    description="OTP_ROUTER_API_TOKEN in the URL, for GET-only tools; it ends up in logs.",
)


def check_token(request: Request, configured: str | None, *, allow_query: bool, what: str) -> None:
    """Compare the request's bearer token (or ``?token=``) with ``configured`` in constant time.

    Raises:
        ApiError: 404 when nothing is configured (the endpoint is disabled),
            401 when the token is missing or wrong.
    """
    if not configured:
        raise ApiError(404, "not_found", f"the {what} is disabled")
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer" and credentials.strip():
        given = credentials.strip()
    elif allow_query:
        given = request.query_params.get("token", "")
    # compare_digest on bytes: constant time whatever the given value contains.
    if not given or not hmac.compare_digest(given.encode("utf-8", "replace"), configured.encode("utf-8")):
        raise ApiError(
            401,
            "unauthorized",
            "missing or invalid API token",
            headers={"WWW-Authenticate": 'Bearer realm="otp-router"'},
        )


def _authorizer(provide: RouterDependency) -> Callable[..., Awaitable[OtpRouter]]:
    async def authorize(
        request: Request,
        router: Annotated[OtpRouter, Depends(provide)],
        _bearer_token: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        _query: Annotated[str | None, Security(_query_token)],
    ) -> OtpRouter:
        secret = router.settings.api_token
        check_token(
            request,
            secret.get_secret_value() if secret is not None else None,
            allow_query=True,
            what="verification API (set OTP_ROUTER_API_TOKEN)",
        )
        return router

    return authorize


# --- the OpenAPI description of the input ------------------------------------------------


def _property_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    prop: dict[str, Any] = dict(model.model_json_schema()["properties"][name])
    # An optional string is {"anyOf": [{"type": "string"}, {"type": "null"}]}; a query
    # parameter cannot be null (absent or empty means none), so document the string.
    for option in prop.pop("anyOf", []):
        if option.get("type") != "null":
            prop.update(option)
    prop.pop("default", None)
    prop.pop("title", None)
    return prop


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    params = []
    for name, info in model.model_fields.items():
        schema = _property_schema(model, name)
        params.append(
            {
                "name": name,
                "in": "query",
                "required": info.is_required(),
                "description": schema.pop("description", ""),
                "schema": schema,
            }
        )
    return params


def _request_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    schema = model.model_json_schema()
    # Form fields cannot be null: the form schema lists plain strings (empty means none).
    form = {
        **schema,
        "properties": {name: _property_schema(model, name) for name in model.model_fields},
    }
    return {
        "required": required,
        "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": form},
        },
    }


_ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Verification id returned by start.",
    "schema": {"type": "string"},
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds until the request may succeed (absent when it never will).",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": schemas.Error, "description": description}
    if headers:
        doc["headers"] = headers
    return doc


_COMMON: dict[int | str, dict[str, Any]] = {
    400: _error(
        "bad_request: an unknown, repeated, missing or non-string field; a query string that is not UTF-8."
    ),
    401: _error(
        "unauthorized: missing or wrong API token.",
        {"WWW-Authenticate": {"description": "Bearer realm.", "schema": {"type": "string"}}},
    ),
    404: _error("not_found: unknown verification, or the API is disabled (no OTP_ROUTER_API_TOKEN)."),
    503: _error("store_unavailable: the store did not answer; nothing was changed, retry later."),
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error(
        "bad_request: an unknown, repeated, missing or non-string field, or a body that cannot be "
        "parsed (not UTF-8, a repeated JSON key, nesting deeper than 32 levels); a query string on a POST."
    ),
    413: _error(f"payload_too_large: the body is larger than {API_BODY_LIMIT} bytes."),
    415: _error("unsupported_media_type: a body that is neither JSON nor form-encoded."),
}


def _responses(*parts: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for part in parts:
        out.update(part)
    return out


def _start_responses(*, body: bool) -> dict[int | str, dict[str, Any]]:
    return _responses(
        _COMMON,
        _BODY_ERRORS if body else {},
        {
            200: {
                "model": schemas.Verification,
                "description": "Idempotent repeat: the verification this key started earlier (nothing sent).",
            },
            201: {
                "description": "Started: the first channel accepted the code.",
                "headers": {
                    "Location": {"description": "The verification's URL.", "schema": {"type": "string"}}
                },
            },
            400: _error(
                "invalid_phone_number, or bad_request (a bad field"
                + (", or a body that cannot be parsed)." if body else ").")
            ),
            409: _error("idempotency_conflict: the key was used for another phone number."),
            422: _error(
                "unsupported_country or unsupported_number_type: the routing policy allows no channel "
                "for the number (premium-rate, toll-free …); nothing was sent."
            ),
            429: _error("rate_limited: too many codes for this number, prefix or country.", _RETRY_AFTER),
            502: _error(
                "all_providers_failed: no channel could send the code; the failed verification's "
                "verification_id and the causes are in the body."
            ),
        },
    )


def _check_responses(*, body: bool) -> dict[int | str, dict[str, Any]]:
    return _responses(
        _COMMON,
        _BODY_ERRORS if body else {},
        {
            400: _error(
                "invalid_code: not digits or the wrong length (no attempt is used), or bad_request"
                + (" (a bad field or body)." if body else " (a bad field).")
            ),
        },
    )


def _location(request: Request, verification_id: str) -> str:
    try:
        # Includes the prefix the routes were included or mounted under.
        return request.url_for("getVerification", id=verification_id).path
    except NoMatchFound:  # pragma: no cover - an app that renamed or wrapped the route
        return f"/v1/verifications/{verification_id}"


# --- the routes ----------------------------------------------------------------------------


def verification_router(
    router: OtpRouter | None = None, *, get_router: RouterDependency | None = None
) -> APIRouter:
    """The ``/v1/verifications`` routes as an ``APIRouter``.

    Args:
        router: Bind this router. Without it (and without ``get_router``) each
            request uses :func:`get_otp_router` (the lifespan state).
        get_router: A dependency of your own that returns the router.

    Returns:
        Routes to ``include_router`` (a ``prefix`` may be given there).
    """
    provide = get_router or router_dependency(router)
    authorize = _authorizer(provide)
    Authorized = Annotated[OtpRouter, Depends(authorize)]
    api = APIRouter(route_class=JsonErrorRoute, tags=["verifications"])

    async def start(request: Request, otp: OtpRouter) -> Response:
        f = await read_input(request, schemas.StartRequest)
        verification = await otp.start(
            f.phone, idempotency_key=f.idempotency_key, default_region=f.default_region
        )
        created = verification.created
        log_event(log, logging.INFO, "api_started", verification=verification.id, new=created)
        location = _location(request, verification.id)
        return JSONResponse(
            verification.to_dict(), status_code=201 if created else 200, headers={"Location": location}
        )

    async def check(request: Request, otp: OtpRouter) -> Response:
        f = await read_input(request, schemas.CheckRequest)
        return JSONResponse((await otp.check(request.path_params["id"], f.code)).to_dict())

    @api.post(
        "/v1/verifications",
        operation_id="startVerification",
        summary="Send a code: Telegram first, SMS when needed.",
        status_code=201,
        response_model=schemas.Verification,
        responses=_start_responses(body=True),
        openapi_extra={"requestBody": _request_body(schemas.StartRequest)},
    )
    async def start_post(request: Request, otp: Authorized) -> Response:
        return await start(request, otp)

    # Before "/{id}": "start" is a word here, never an id (ids start with "v_").
    @api.get(
        "/v1/verifications/start",
        operation_id="startVerificationGet",
        summary="Start, with query parameters (for tools that can only fetch a URL).",
        status_code=201,
        response_model=schemas.Verification,
        responses=_start_responses(body=False),
        openapi_extra={"parameters": _query_parameters(schemas.StartRequest)},
    )
    async def start_get(request: Request, otp: Authorized) -> Response:
        return await start(request, otp)

    @api.get(
        "/v1/verifications/{id}",
        name="getVerification",
        operation_id="getVerification",
        summary="Current state of a verification.",
        response_model=schemas.Verification,
        responses=_COMMON,
        openapi_extra={"parameters": [_ID_PARAMETER]},
    )
    async def get(request: Request, otp: Authorized) -> Response:
        await read_input(request, schemas.NoFields)
        return JSONResponse((await otp.get(request.path_params["id"])).to_dict())

    @api.post(
        "/v1/verifications/{id}/check",
        operation_id="checkCode",
        summary="Check an entered code.",
        response_model=schemas.CheckResult,
        responses=_check_responses(body=True),
        openapi_extra={"parameters": [_ID_PARAMETER], "requestBody": _request_body(schemas.CheckRequest)},
    )
    async def check_post(request: Request, otp: Authorized) -> Response:
        return await check(request, otp)

    @api.get(
        "/v1/verifications/{id}/check",
        operation_id="checkCodeGet",
        summary="Check an entered code, with a query parameter.",
        response_model=schemas.CheckResult,
        responses=_check_responses(body=False),
        openapi_extra={"parameters": [_ID_PARAMETER, *_query_parameters(schemas.CheckRequest)]},
    )
    async def check_get(request: Request, otp: Authorized) -> Response:
        return await check(request, otp)

    @api.post(
        "/v1/verifications/{id}/cancel",
        operation_id="cancelVerification",
        summary="Give up on a verification (an undelivered Telegram message is revoked).",
        response_model=schemas.Verification,
        responses=_responses(_COMMON, _BODY_ERRORS),
        openapi_extra={
            "parameters": [_ID_PARAMETER],
            "requestBody": _request_body(schemas.NoFields, required=False),
        },
    )
    async def cancel(request: Request, otp: Authorized) -> Response:
        await read_input(request, schemas.NoFields)
        return JSONResponse((await otp.cancel(request.path_params["id"])).to_dict())

    @api.post(
        "/v1/verifications/{id}/resend",
        operation_id="resendCode",
        summary="The user did not get the code: move to the next channel.",
        response_model=schemas.Verification,
        responses=_responses(
            _COMMON,
            _BODY_ERRORS,
            {
                429: _error(
                    "resend_not_allowed: too soon (Retry-After says when), no resends left, or over.",
                    _RETRY_AFTER,
                )
            },
        ),
        openapi_extra={
            "parameters": [_ID_PARAMETER],
            "requestBody": _request_body(schemas.NoFields, required=False),
        },
    )
    async def resend(request: Request, otp: Authorized) -> Response:
        await read_input(request, schemas.NoFields)
        return JSONResponse((await otp.resend(request.path_params["id"])).to_dict())

    return api
