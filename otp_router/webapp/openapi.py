"""The OpenAPI 3.1 description of the app, served at ``GET /openapi.json``.

Hand-written rather than generated: the app has a dozen routes, and writing
the document out keeps the error codes, the two authentication forms and the
webhook answers described exactly as implemented. A test validates it with
``openapi-spec-validator`` and checks real responses against its schemas.
"""

from __future__ import annotations

from typing import Any

import otp_router

__all__ = ["openapi_document"]

_ERROR_CODES = [
    "bad_request",
    "invalid_phone_number",
    "invalid_code",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "idempotency_conflict",
    "payload_too_large",
    "unsupported_media_type",
    "unsupported_country",
    "rate_limited",
    "resend_not_allowed",
    "invalid_signature",
    "stale_webhook",
    "all_providers_failed",
    "store_unavailable",
    "internal_error",
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(_ref("Error"), description, headers)


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds until the request may succeed (absent when it never will).",
        "schema": {"type": "integer", "minimum": 1},
    }
}

_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Verification id returned by start.",
    "schema": {"type": "string"},
}

_COMMON_ERRORS = {
    "400": _error("Unknown, repeated, missing or non-string field; unparseable body."),
    "401": _error("Missing or wrong API token."),
    "404": _error("Unknown verification, or the API is disabled (no OTP_ROUTER_API_TOKEN)."),
}


def _body(schema_name: str) -> dict[str, Any]:
    schema = _ref(schema_name)
    return {
        "required": True,
        "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": schema},
        },
    }


def _query(name: str, description: str, *, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


def _header(name: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}


def _schemas() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "enum": _ERROR_CODES},
                        "message": {"type": "string", "description": "For people; may change."},
                    },
                }
            },
        },
        "StartRequest": {
            "type": "object",
            "required": ["phone"],
            "additionalProperties": False,
            "properties": {
                "phone": {
                    "type": "string",
                    "description": "International form unless default_region is set.",
                },
                "idempotency_key": {
                    **nullable_str,
                    "maxLength": 200,
                    "description": "Same key, same verification: nothing is sent twice.",
                },
                "default_region": {**nullable_str, "description": "ISO region for national-format numbers."},
            },
        },
        "CheckRequest": {
            "type": "object",
            "required": ["code"],
            "additionalProperties": False,
            "properties": {"code": {"type": "string", "pattern": "^[0-9]+$"}},
        },
        "Fallback": {
            "type": "object",
            "required": ["from", "to", "reason", "at"],
            "properties": {
                "from": {"type": "string"},
                "to": nullable_str,
                "reason": {"type": "string"},
                "at": {"type": "number"},
            },
        },
        "Verification": {
            "type": "object",
            "description": "Never contains the phone number or the code.",
            "required": [
                "id",
                "status",
                "channel",
                "region",
                "created_at",
                "expires_at",
                "attempts_left",
                "cost",
                "delivered",
                "fallbacks",
            ],
            "properties": {
                "id": {"type": "string"},
                "status": {
                    "type": "string",
                    "enum": ["pending", "verified", "expired", "canceled", "failed", "too_many_attempts"],
                },
                "channel": {"type": ["string", "null"], "enum": ["telegram", "sms", None]},
                "region": {"type": "string", "description": "ISO 3166-1 alpha-2 region of the number."},
                "created_at": {"type": "number", "description": "Unix time."},
                "expires_at": {"type": "number", "description": "Unix time."},
                "attempts_left": {"type": "integer", "minimum": 0},
                "cost": {"type": "string", "description": "Net cost so far, USD, as a decimal string."},
                "delivered": {"type": "boolean"},
                "fallbacks": {"type": "array", "items": _ref("Fallback")},
                "time_to_code": {
                    "type": ["number", "null"],
                    "description": "Seconds from creation to the first delivery report; null before one.",
                },
                "paid_twice": {
                    "type": "boolean",
                    "description": "A delivered (charged) Telegram message and a charged SMS.",
                },
                "paid_twice_extra": {
                    "type": "string",
                    "description": "USD paid for other channels on top of that Telegram message (decimal).",
                },
            },
        },
        "CheckResult": {
            "type": "object",
            "required": ["id", "status", "valid", "attempts_left"],
            "properties": {
                "id": {"type": "string"},
                "status": {
                    "type": "string",
                    "enum": ["valid", "invalid", "expired", "too_many_attempts", "not_found"],
                },
                "valid": {"type": "boolean"},
                "attempts_left": {"type": "integer", "minimum": 0},
            },
        },
        "WebhookAck": {
            "type": "object",
            "required": ["ok", "outcome"],
            "properties": {
                "ok": {"const": True},
                "outcome": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
            },
        },
        "Health": {
            "type": "object",
            "required": ["ok", "failing"],
            "properties": {
                "ok": {"type": "array", "items": {"type": "string"}},
                "failing": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


def _api_paths() -> dict[str, Any]:
    started = {
        "201": _json(_ref("Verification"), "Started; the code is on its way."),
        "200": _json(_ref("Verification"), "Idempotent repeat: the verification this key started earlier."),
        **_COMMON_ERRORS,
        "400": _error("invalid_phone_number, or a bad field (bad_request)."),
        "409": _error("idempotency_conflict: the key was used for another phone number."),
        "422": _error("unsupported_country: the routing policy allows no channel for the number."),
        "429": _error("rate_limited: too many codes for this number or country.", _RETRY_AFTER),
    }
    checked = {
        "200": _json(_ref("CheckResult"), "The check's outcome (not_found for an unknown id)."),
        **_COMMON_ERRORS,
        "400": _error("invalid_code: not digits or the wrong length (no attempt used), or a bad field."),
    }
    one = {"200": _json(_ref("Verification"), "The verification."), **_COMMON_ERRORS}
    return {
        "/v1/verifications": {
            "post": {
                "operationId": "startVerification",
                "summary": "Send a code: Telegram first, SMS when needed.",
                "tags": ["verifications"],
                "requestBody": _body("StartRequest"),
                "responses": started,
            }
        },
        "/v1/verifications/start": {
            "get": {
                "operationId": "startVerificationGet",
                "summary": "Start, with query parameters (for tools that can only fetch a URL).",
                "tags": ["verifications"],
                "parameters": [
                    _query("phone", "The phone number.", required=True),
                    _query("idempotency_key", "Same key, same verification.", required=False),
                    _query("default_region", "ISO region for national-format numbers.", required=False),
                ],
                "responses": started,
            }
        },
        "/v1/verifications/{id}": {
            "get": {
                "operationId": "getVerification",
                "summary": "Current state of a verification.",
                "tags": ["verifications"],
                "parameters": [_ID_PARAM],
                "responses": one,
            }
        },
        "/v1/verifications/{id}/check": {
            "post": {
                "operationId": "checkCode",
                "summary": "Check an entered code.",
                "tags": ["verifications"],
                "parameters": [_ID_PARAM],
                "requestBody": _body("CheckRequest"),
                "responses": checked,
            },
            "get": {
                "operationId": "checkCodeGet",
                "summary": "Check an entered code, with a query parameter.",
                "tags": ["verifications"],
                "parameters": [_ID_PARAM, _query("code", "The entered code.", required=True)],
                "responses": checked,
            },
        },
        "/v1/verifications/{id}/cancel": {
            "post": {
                "operationId": "cancelVerification",
                "summary": "Give up on a verification (an undelivered Telegram message is revoked).",
                "tags": ["verifications"],
                "parameters": [_ID_PARAM],
                "responses": one,
            }
        },
        "/v1/verifications/{id}/resend": {
            "post": {
                "operationId": "resendCode",
                "summary": "The user did not get the code: move to the next channel.",
                "tags": ["verifications"],
                "parameters": [_ID_PARAM],
                "responses": {
                    **one,
                    "429": _error("resend_not_allowed: too soon, no resends left, or over.", _RETRY_AFTER),
                },
            }
        },
    }


def _other_paths() -> dict[str, Any]:
    no_auth: list[dict[str, list[str]]] = [{}]
    refused = _error("invalid_signature or stale_webhook: nothing was changed.")
    ack = _json(_ref("WebhookAck"), "Acknowledged (also for duplicates and unknown verifications).")
    return {
        "/webhooks/telegram": {
            "post": {
                "operationId": "telegramReport",
                "summary": "Telegram Gateway delivery report, signed with X-Request-Signature.",
                "tags": ["webhooks"],
                "security": no_auth,
                "parameters": [
                    _header("X-Request-Timestamp"),
                    _header("X-Request-Signature"),
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": ack, "400": _error("Signed but not a RequestStatus."), "403": refused},
            }
        },
        "/webhooks/twilio": {
            "post": {
                "operationId": "twilioStatusCallback",
                "summary": "Twilio status callback, signed with X-Twilio-Signature over the public URL.",
                "tags": ["webhooks"],
                "security": no_auth,
                "parameters": [
                    _query("vid", "Verification id (part of the signed URL).", required=True),
                    _header("X-Twilio-Signature"),
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": ack,
                    "400": _error("Signed but no MessageSid/MessageStatus."),
                    "403": refused,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus exposition of the otp_router_ metrics.",
                "tags": ["operations"],
                "security": no_auth,
                "responses": {
                    "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}},
                    "503": {
                        "description": "prometheus-client is not installed.",
                        "content": {"text/plain": {}},
                    },
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Ping the store and every registered dependency.",
                "tags": ["operations"],
                "security": no_auth,
                "responses": {
                    "200": _json(_ref("Health"), "Every ping answered."),
                    "500": _json(_ref("Health"), "At least one ping failed; see failing."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "tags": ["operations"],
                "security": no_auth,
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
            }
        },
    }


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document.

    Args:
        server_url: Public base URL to list under ``servers``, if known.

    Returns:
        A JSON-ready dict.
    """
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "otp-router",
            "version": otp_router.__version__,
            "summary": "Login codes through the Telegram Gateway first, Twilio SMS when needed.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "security": [{"bearer": []}, {"queryToken": []}],
        "tags": [
            {"name": "verifications", "description": "Start and check codes (needs OTP_ROUTER_API_TOKEN)."},
            {"name": "webhooks", "description": "Provider delivery reports (authenticated by signature)."},
            {"name": "operations", "description": "Metrics, health and this document."},
        ],
        "paths": {**_api_paths(), **_other_paths()},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "OTP_ROUTER_API_TOKEN."},
                "queryToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "OTP_ROUTER_API_TOKEN in the URL, for GET-only tools; it ends up in logs.",
                },
            },
        },
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document
