"""``otp-router emulate`` and the CLI's shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from otp_router.cli import COMMANDS, build_parser, main
from otp_router.config import Settings
from otp_router.emulators import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    DEFAULT_TELEGRAM_TOKEN,
    emulator_credentials,
    serve_emulators,
)
from otp_router.emulators.script import Script

GB = "+447400123456"


def _emulate_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``otp-router emulate`` on free ports (the installed console script when present)."""
    script = Path(sys.executable).with_name("otp-router")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from otp_router.cli import main; sys.exit(main())"]
    )
    return subprocess.Popen(
        # Every port free (--vonage-port too): a fixed one collides with any other run on the machine.
        [*command, "emulate", "--telegram-port", "0", "--twilio-port", "0", "--vonage-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_emulate_serves_both_until_sigterm(tmp_path: Path) -> None:
    """The subprocess prints both URLs as one JSON line, serves the script, and exits 0 on SIGTERM."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps({GB: {"sms_invalid": True}}), encoding="utf-8")
    process = _emulate_process("--script", str(script), "--time-scale", "0.1")
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        assert set(ready) == {"telegram_url", "twilio_url", "vonage_url"}
        auth = (DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)
        url = f"{ready['twilio_url']}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json"
        with httpx.Client(timeout=5) as client:
            ok = client.post(
                url, auth=auth, data={"To": "+12025550143", "From": "+15005550006", "Body": "hi"}
            )
            refused = client.post(url, auth=auth, data={"To": GB, "From": "+15005550006", "Body": "hi"})
            log = client.get(f"{ready['twilio_url']}/_emulator/log").json()
            telegram = client.get(f"{ready['telegram_url']}/_emulator/log")
        assert ok.status_code == 201
        assert refused.json()["code"] == 21211  # from the --script file
        assert [entry["outcome"] for entry in log] == ["queued", "error 21211"]
        assert telegram.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def test_emulate_uses_the_router_credentials_from_settings() -> None:
    """With OTP_ROUTER_TWILIO__* set, the emulator accepts those and refuses the defaults."""
    sid, token = "AC" + "5" * 32, "shared-secret"
    env = {"OTP_ROUTER_TWILIO__ACCOUNT_SID": sid, "OTP_ROUTER_TWILIO__AUTH_TOKEN": token}
    process = _emulate_process(env=env)
    try:
        assert process.stdout is not None
        base = json.loads(process.stdout.readline())["twilio_url"]
        data = {"To": "+12025550143", "From": "+15005550006", "Body": "hi"}
        with httpx.Client(timeout=5) as client:
            mine = client.post(
                f"{base}/2010-04-01/Accounts/{sid}/Messages.json", auth=(sid, token), data=data
            )
            default = client.post(
                f"{base}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json",
                auth=(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN),
                data=data,
            )
        assert mine.status_code == 201
        assert default.status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    assert process.returncode == 0


def test_config_error_is_one_clean_message_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid settings print one 'otp-router: …' message naming the variable, and exit 2."""
    monkeypatch.setenv("OTP_ROUTER_STORE_URL", "ftp://nowhere")
    assert main(["emulate", "--telegram-port", "0", "--twilio-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("otp-router: invalid settings")
    assert "OTP_ROUTER_STORE_URL" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--script", "missing.json"], "--script missing.json"),
        (["--time-scale", "0"], "--time-scale"),
    ],
)
def test_bad_emulate_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    """A missing script file or a non-positive time scale is a clean exit 2, before anything starts."""
    assert main(["emulate", "--telegram-port", "0", "--twilio-port", "0", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_bad_script_content_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A script with an unknown behaviour field is refused with exit 2."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({GB: {"sms_typo": 1}}), encoding="utf-8")
    assert main(["emulate", "--script", str(path)]) == 2
    assert "sms_typo" in capsys.readouterr().err


def test_parser_has_a_subcommand_per_registered_command() -> None:
    """build_parser() offers every COMMANDS entry and requires a subcommand."""
    parser = build_parser()
    args = parser.parse_args(["emulate", "--host", "0.0.0.0", "--twilio-port", "9"])
    assert (args.command, args.host, args.twilio_port, args.time_scale) == ("emulate", "0.0.0.0", 9, 1.0)
    assert "emulate" in COMMANDS
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])
    assert info.value.code == 2


def test_credentials_fall_back_to_documented_defaults(make_settings: Any) -> None:
    """Empty settings give the exported defaults, so the demo can set both sides the same."""
    assert emulator_credentials(make_settings()) == (
        DEFAULT_TELEGRAM_TOKEN,
        DEFAULT_ACCOUNT_SID,
        DEFAULT_AUTH_TOKEN,
    )


async def test_serve_emulators_shares_one_script() -> None:
    """Both emulators run from one call, share the script, and stop together."""
    pytest.importorskip("otp_router.emulators.telegram")
    script = Script(time_scale=0.1)
    pair = await serve_emulators(
        Settings(store_url="memory://"), host="127.0.0.1", telegram_port=0, twilio_port=0, script=script
    )
    try:
        assert pair.telegram.script is pair.twilio.script is script
        assert pair.twilio_url.startswith("http://127.0.0.1:")
        assert pair.telegram_url != pair.twilio_url
    finally:
        await pair.aclose()
