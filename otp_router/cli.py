"""The ``otp-router`` command line.

Each subcommand is a function ``(args, settings) -> exit code`` registered in
:data:`COMMANDS` together with a function adding its arguments, so new
subcommands (``send``, ``check``, ``status``, ``demo``, ``worker``,
``assets``) plug in without touching :func:`main`. Settings are read once with
:meth:`Settings.load`; a configuration error prints one clean message and
exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otp_router import __version__
from otp_router.config import Settings
from otp_router.errors import ConfigError, InputError
from otp_router.inputs import check_text

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

#: Exit status for a configuration or usage error.
EXIT_CONFIG = 2


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand.

    Attributes:
        help: One line for ``otp-router --help``.
        add_arguments: Adds the subcommand's options to its parser.
        run: ``(args, settings) -> exit status``.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings], int]
    #: Whether this invocation builds a router from the settings: then missing
    #: provider credentials are reported with the invalid values, before anything runs.
    needs_providers: Callable[[argparse.Namespace], bool] = lambda args: False


# ------------------------------------------------------------------- emulate


def _emulate_arguments(parser: argparse.ArgumentParser) -> None:
    from otp_router.emulators import DEFAULT_TELEGRAM_PORT, DEFAULT_TWILIO_PORT, DEFAULT_VONAGE_PORT

    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument(
        "--telegram-port",
        type=int,
        default=DEFAULT_TELEGRAM_PORT,
        help="Telegram Gateway emulator port, 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--twilio-port",
        type=int,
        default=DEFAULT_TWILIO_PORT,
        help="Twilio emulator port, 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--vonage-port",
        type=int,
        default=DEFAULT_VONAGE_PORT,
        help="Vonage SMS emulator port, 0 for any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--script", type=Path, help='JSON behaviour script, e.g. {"+15550001": {"telegram": "absent"}}'
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every emulated delay and ttl (0.1 = ten times faster; default: %(default)s)",
    )


def _emulate(args: argparse.Namespace, settings: Settings) -> int:
    from otp_router.emulators import EmulatorPair, Script, run_emulators

    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        raise ConfigError("--time-scale must be a finite number greater than 0")
    ports = (
        ("--telegram-port", args.telegram_port),
        ("--twilio-port", args.twilio_port),
        ("--vonage-port", args.vonage_port),
    )
    for option, port in ports:
        if not 0 <= port <= 65535:
            raise ConfigError(f"{option} must be 0..65535")
    try:
        check_text(args.host, name="--host", max_length=255)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    try:
        script = (
            Script.from_file(args.script, time_scale=args.time_scale)
            if args.script is not None
            else Script(time_scale=args.time_scale)
        )
    except OSError as exc:
        raise ConfigError(f"--script {args.script}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--script {args.script}: {exc}") from None

    def ready(pair: EmulatorPair) -> None:
        # One JSON line on stdout: scripts and tests wait for it before connecting.
        urls = {
            "telegram_url": pair.telegram_url,
            "twilio_url": pair.twilio_url,
            "vonage_url": pair.vonage_url,
        }
        print(json.dumps(urls), flush=True)

    asyncio.run(
        run_emulators(
            settings,
            host=args.host,
            telegram_port=args.telegram_port,
            twilio_port=args.twilio_port,
            script=script,
            on_ready=ready,
            vonage_port=args.vonage_port,
        )
    )
    return 0


# ------------------------------------------------------- send / check / status / demo


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when first called, so importing this module stays light
    and one subcommand's module failing to import cannot break the others at import time."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=300, help="population size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.05,
        help="real seconds per emulated provider second (default: %(default)s, i.e. 20x faster)",
    )
    parser.add_argument(
        "--shape",
        default="mixed",
        help="population shape from otp_router.population.SHAPES (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary numbers to this JSON file")


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from otp_router.demo import main as demo_main
    from otp_router.population import SHAPES

    if args.users < 1 or not 0 < args.time_scale <= 1:  # NaN fails this comparison too
        raise ConfigError("--users must be at least 1 and --time-scale in (0, 1]")
    if args.shape not in SHAPES:
        raise ConfigError(f"--shape must be one of {', '.join(SHAPES)}")
    # The demo is self-contained: it ignores OTP_ROUTER_* provider settings on purpose.
    return demo_main(args.users, args.seed, args.time_scale, args.json, args.shape)


# -------------------------------------------------------------------- assets


def _assets_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_subparsers(dest="asset", metavar="ASSET", required=True)
    which.add_parser("list", help="name every shipped asset")
    dashboard = which.add_parser("dashboard", help="print a Grafana dashboard (JSON)")
    dashboard.add_argument("name", help="dashboard name, see 'otp-router assets list'")
    which.add_parser("alerts", help="print the Prometheus alert and recording rules (alerts.yml)")
    which.add_parser("prometheus", help="print a Prometheus configuration that loads alerts.yml beside it")


def _assets(args: argparse.Namespace, settings: Settings) -> int:
    from otp_router import assets

    match args.asset:
        case "list":
            text = "".join(f"dashboard {name}\n" for name in assets.dashboard_names())
            text += "alerts\nprometheus\n"
        case "dashboard":
            try:
                text = assets.dashboard(args.name)
            except KeyError as exc:
                raise ConfigError(str(exc.args[0])) from None
        case "alerts":
            text = assets.alerts()
        case _:
            text = assets.prometheus_config()
    sys.stdout.write(text)
    return 0


#: Subcommand name → definition. Add new subcommands here.
COMMANDS: dict[str, Command] = {
    "send": Command(
        help="send a code to PHONE (Telegram first, SMS fallback); prints the verification as JSON",
        add_arguments=_lazy("otp_router.commands", "send_arguments"),
        run=_lazy("otp_router.commands", "run_send"),
        needs_providers=lambda args: True,
    ),
    "check": Command(
        help="check CODE for verification ID; prints the result as JSON, exits 0 only if valid",
        add_arguments=_lazy("otp_router.commands", "check_arguments"),
        run=_lazy("otp_router.commands", "run_check"),
        needs_providers=lambda args: True,
    ),
    "status": Command(
        help="print verification ID as JSON",
        add_arguments=_lazy("otp_router.commands", "status_arguments"),
        run=_lazy("otp_router.commands", "run_status"),
        needs_providers=lambda args: True,
    ),
    "demo": Command(
        help="run a simulated population through the router against the built-in emulators",
        add_arguments=_demo_arguments,
        run=_demo,
    ),
    "emulate": Command(
        help="serve the Telegram Gateway, Twilio and Vonage emulators until SIGTERM/SIGINT",
        add_arguments=_emulate_arguments,
        run=_emulate,
    ),
    "worker": Command(
        help="consume the queue, fire deadlines and serve webhooks until SIGTERM (--check: health)",
        add_arguments=_lazy("otp_router.worker", "worker_arguments"),
        run=_lazy("otp_router.worker", "run_worker_command"),
        # The liveness probe only reads a heartbeat.
        needs_providers=lambda args: not args.check,
    ),
    "assets": Command(
        help="print the shipped Grafana dashboards, alert rules or Prometheus configuration",
        add_arguments=_assets_arguments,
        run=_assets,
    ),
}


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command.

    Args:
        commands: Commands to offer (default: :data:`COMMANDS`).

    Returns:
        The parser; ``args.command`` holds the chosen subcommand's name.
    """
    parser = argparse.ArgumentParser(
        prog="otp-router",
        description="Login codes through the Telegram Gateway first, Twilio SMS when needed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in (commands or COMMANDS).items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status: 0 on success, 1 for bad input, 2 for
        configuration errors (naming every invalid or missing variable), 3
        when ``send`` could not send the code on any channel.
    """
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        # Every invalid or missing variable in one message, before anything is sent.
        settings = Settings.load(require_providers=command.needs_providers(args))
        return command.run(args, settings)
    except ConfigError as exc:
        print(f"otp-router: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
