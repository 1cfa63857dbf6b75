"""Test-only crash points: SIGKILL this process at a named point of its work.

The crash suite (``tests/test_crash_suite.py``) proves that a process killed
at any write-ahead phase loses nothing, sends nothing twice and books every
charge. To kill a worker *exactly* at a phase it sets, in the worker's
environment, both::

    OTP_ROUTER_TEST_CRASH_AT=send.telegram.accepted
    OTP_ROUTER_TEST_CRASH_CONFIRM=kill-this-process

and optionally ``OTP_ROUTER_TEST_CRASH_AFTER=N`` (die at the N-th time the
point is reached, default 1). The process then kills itself with SIGKILL at
that point: no cleanup, no flush, like ``kill -9``.

Both variables are needed, and the second must hold that exact phrase, so a
stray ``OTP_ROUTER_TEST_CRASH_AT`` in a production environment does nothing.
They are not settings (not in :class:`~otp_router.config.Settings`, not in
``.env``) and are read once, when this module is imported.

Points (see :data:`POINTS`): ``probe`` (the probing phase is stored, the probe
not yet made), ``probe.answered`` (the provider answered, the answer not yet
stored), ``send.<channel>`` (the sending phase is stored, the send not yet
made), ``send.<channel>.accepted`` (the provider accepted, not yet stored),
``webhook.received`` (a signed report arrived, not yet applied) and
``webhook.applied`` (the report is stored, its follow-up effects not yet done).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crash_point"]

POINTS = frozenset(
    {
        "probe",
        "probe.answered",
        "send.telegram",
        "send.telegram.accepted",
        "send.sms",
        "send.sms.accepted",
        "webhook.received",
        "webhook.applied",
    }
)
_CONFIRM = "kill-this-process"


def _armed() -> tuple[str | None, int]:
    point = os.environ.get("OTP_ROUTER_TEST_CRASH_AT")
    if point not in POINTS or os.environ.get("OTP_ROUTER_TEST_CRASH_CONFIRM") != _CONFIRM:
        return None, 0
    after = os.environ.get("OTP_ROUTER_TEST_CRASH_AFTER", "1")
    return point, int(after) if after.isascii() and after.isdigit() and int(after) > 0 else 1


_POINT, _LEFT = _armed()


def crash_point(name: str) -> None:
    """Kill the process with SIGKILL if ``name`` is the armed crash point (tests only; else a no-op)."""
    global _LEFT
    if _POINT is None or name != _POINT:
        return
    _LEFT -= 1
    if _LEFT <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
