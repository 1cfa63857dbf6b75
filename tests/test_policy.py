"""Routing policy: defaults, per-country overrides, TOML loading and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from otp_router.errors import ConfigError, UnsupportedCountry
from otp_router.policy import AutoDeadline, Policy, Step
from otp_router.providers.base import ChannelName

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "policy.example.toml"


def test_default_is_telegram_then_sms() -> None:
    """The built-in workflow probes Telegram with a deadline learned within 3..30 s (its ttl), then SMS."""
    steps = Policy().steps_for("GB")
    assert [s.channel for s in steps] == [ChannelName.TELEGRAM, ChannelName.SMS]
    assert steps[0].probe and steps[0].ttl == 30
    assert steps[0].auto == AutoDeadline(3.0, 30.0) and steps[0].deliver_within == 30.0


def test_example_file_overrides() -> None:
    """The example policy reorders, skips and blocks per country."""
    policy = Policy.load(EXAMPLE)
    assert [s.channel for s in policy.steps_for("US")] == [ChannelName.SMS]
    assert [s.channel for s in policy.steps_for("NG")] == [ChannelName.TELEGRAM]
    assert [s.channel for s in policy.steps_for("DE")] == [ChannelName.TELEGRAM, ChannelName.SMS]
    with pytest.raises(UnsupportedCountry):
        policy.steps_for("KP")
    assert policy.steps_for("DE")[0].auto == AutoDeadline(3.0, 30.0)
    assert policy.steps_for("BR")[0].auto is None  # its own fixed times


def test_telegram_ttl_is_clamped_to_its_range() -> None:
    """Telegram's ttl stays within 30..3600 whatever the step deadline."""
    assert Step(ChannelName.TELEGRAM, 5).ttl == 30
    assert Step(ChannelName.TELEGRAM, 90).ttl == 90
    assert Step(ChannelName.TELEGRAM, 7200).ttl == 3600
    assert Step(ChannelName.SMS, 5).ttl == 5


@pytest.mark.parametrize(
    "text",
    [
        '[[steps]]\nchannel = "pigeon"\n',
        "[countries.usa]\nblocked = true\n",
        '[[steps]]\nchannel = "sms"\ndeliver_within = -1\n',
        "surprise = 1\n",
        "not toml [",
    ],
)
def test_bad_policy_names_the_setting(tmp_path: Path, text: str) -> None:
    """A broken policy file is a ConfigError naming OTP_ROUTER_POLICY_FILE."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="OTP_ROUTER_POLICY_FILE"):
        Policy.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("surprise = 1\n", "unknown key 'surprise'"),
        ('[[steps]]\nchannel = "telegram"\ndeliver_whitin = 10\n', "steps[0]: unknown key 'deliver_whitin'"),
        (
            '[[steps]]\nchannel = "telegram"\n[[steps]]\nchannel = "sms"\nprobe_it = true\n',
            "steps[1]: unknown key 'probe_it'",
        ),
        ('[countries.NG]\nskipp = ["sms"]\n', "countries.NG: unknown key 'skipp'"),
        ("[countries.BR.telegram]\nttll = 60\n", "countries.BR.telegram: unknown key 'ttll'"),
        ("[countries.BR.telegram]\nprobe = false\n", "countries.BR.telegram: unknown key 'probe'"),
    ],
)
def test_unknown_keys_are_refused_with_where(tmp_path: Path, text: str, message: str) -> None:
    """A misspelt key anywhere is refused, naming the key and where it is."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    assert message in str(info.value)


def test_deadline_and_ttl_are_separate() -> None:
    """A step's deadline and ttl are configured apart; the ttl defaults to max(30, deadline)."""
    policy = Policy.from_dict(
        {
            "steps": [
                {"channel": "telegram", "deliver_within": 10, "ttl": 60},
                {"channel": "sms", "deliver_within": 120},
            ]
        }
    )
    tg, sms = policy.steps_for("GB")
    assert (tg.deliver_within, tg.ttl, tg.probe) == (10.0, 60, True)
    assert (sms.deliver_within, sms.ttl, sms.probe) == (120.0, 120, False)
    assert Step(ChannelName.TELEGRAM, 10).ttl == 30


def test_country_overrides_a_steps_times() -> None:
    """[countries.XX.telegram] replaces the step's deadline/ttl for that country only."""
    policy = Policy.from_dict(
        {
            "steps": [
                {"channel": "telegram", "deliver_within": 10, "ttl": 45},
                {"channel": "sms", "deliver_within": 120},
            ],
            "countries": {
                "BR": {"telegram": {"deliver_within": 20}},
                "IN": {"telegram": {"ttl": 90}, "order": ["telegram"]},
            },
        }
    )
    assert [(s.channel, s.deliver_within, s.ttl) for s in policy.steps_for("BR")] == [
        (ChannelName.TELEGRAM, 20.0, 30),  # a new deadline re-derives the ttl
        (ChannelName.SMS, 120.0, 120),
    ]
    assert [(s.deliver_within, s.ttl, s.probe) for s in policy.steps_for("IN")] == [(10.0, 90, True)]
    assert policy.steps_for("DE")[0].ttl == 45


def test_country_override_on_the_default_workflow() -> None:
    """A country step table also works when the file has no [[steps]] (the built-in workflow)."""
    policy = Policy.from_dict({"countries": {"GB": {"telegram": {"deliver_within": 12, "ttl": 30}}}})
    tg = policy.steps_for("GB")[0]
    assert (tg.channel, tg.deliver_within, tg.ttl, tg.probe) == (ChannelName.TELEGRAM, 12.0, 30, True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": [{"channel": "telegram", "ttl": 20}]}, "steps[0].ttl must be 30..3600"),
        ({"steps": [{"channel": "telegram", "ttl": 4000}]}, "steps[0].ttl must be 30..3600"),
        ({"steps": [{"channel": "telegram", "deliver_within": "soon"}]}, "steps[0].deliver_within"),
        ({"steps": [{"channel": "sms"}], "countries": {"GB": {"telegram": {"ttl": 60}}}}, "no telegram step"),
        ({"steps": [{"deliver_within": 5}]}, "steps[0]: missing key 'channel'"),
        ({"countries": {"GB": {"telegram": 5}}}, "countries.GB.telegram must be a table"),
        (
            {"steps": [{"channel": "sms", "deliver_within": "auto"}]},
            "steps[0].deliver_within = 'auto' is only for routes that refund undelivered messages",
        ),
        (
            {"steps": [{"channel": "telegram", "deliver_within": 10, "deliver_within_max": 20}]},
            "steps[0].deliver_within_max is only for deliver_within = 'auto'",
        ),
        (
            {
                "steps": [
                    {"channel": "telegram", "deliver_within": "auto", "deliver_within_max": 60, "ttl": 30}
                ]
            },
            "steps[0].deliver_within_max must not exceed the ttl (30 s)",
        ),
        (
            {
                "steps": [
                    {
                        "channel": "telegram",
                        "deliver_within": "auto",
                        "deliver_within_min": 20,
                        "ttl": 60,
                        "deliver_within_max": 10,
                    }
                ]
            },
            "steps[0].deliver_within_min must not exceed deliver_within_max",
        ),
        (
            {"steps": [{"channel": "telegram", "deliver_within": "auto", "deliver_within_min": 0}]},
            "steps[0].deliver_within_min must be positive",
        ),
        ({"wait_cost_per_second": -1}, "wait_cost_per_second must not be negative"),
        ({"sms_latency": "slow"}, "sms_latency must be a number"),
    ],
)
def test_bad_step_values_are_refused(data: dict[str, object], message: str) -> None:
    """Out-of-range ttls, non-numbers, overrides of absent steps: ConfigError saying where."""
    with pytest.raises(ConfigError) as info:
        Policy.from_dict(data)
    assert message in str(info.value)


def test_auto_deadline_bounds_and_ttl() -> None:
    """deliver_within = "auto" keeps its bounds; the ttl defaults from the maximum and vice versa."""
    policy = Policy.from_dict(
        {
            "wait_cost_per_second": 0.002,
            "auto_min_samples": 20,
            "sms_latency": 8,
            "steps": [
                {
                    "channel": "telegram",
                    "deliver_within": "auto",
                    "deliver_within_min": 2,
                    "deliver_within_max": 45,
                },
                {"channel": "sms", "deliver_within": 120},
            ],
        }
    )
    tg = policy.steps[0]
    assert tg.auto == AutoDeadline(2.0, 45.0)
    assert (tg.deliver_within, tg.ttl) == (45.0, 45), "cold start at the maximum; ttl from it"
    assert (policy.wait_cost_per_second, policy.auto_min_samples, policy.sms_latency) == (0.002, 20.0, 8.0)
    only_ttl = Policy.from_dict({"steps": [{"channel": "telegram", "deliver_within": "auto", "ttl": 60}]})
    assert only_ttl.steps[0].auto == AutoDeadline(3.0, 60.0)
    bare = Policy.from_dict({"steps": [{"channel": "telegram", "deliver_within": "auto"}]})
    assert (bare.steps[0].auto, bare.steps[0].ttl) == (AutoDeadline(3.0, 30.0), 30)


def test_country_overrides_between_fixed_and_auto() -> None:
    """A country may turn a fixed deadline into auto (with its own bounds) or an auto one into a fixed one."""
    auto = {
        "channel": "telegram",
        "deliver_within": "auto",
        "deliver_within_min": 4,
        "deliver_within_max": 30,
    }
    policy = Policy.from_dict(
        {
            "steps": [auto, {"channel": "sms", "deliver_within": 120}],
            "countries": {
                "US": {"telegram": {"deliver_within": 5}},
                "BR": {"telegram": {"deliver_within_max": 60}},
                "IN": {"telegram": {"deliver_within_min": 8}},
            },
        }
    )
    us, br, india = (policy.steps_for(r)[0] for r in ("US", "BR", "IN"))
    assert (us.auto, us.deliver_within, us.ttl) == (None, 5.0, 30)
    assert (br.auto, br.ttl) == (AutoDeadline(4.0, 60.0), 60)
    assert india.auto == AutoDeadline(8.0, 30.0)
    fixed = Policy.from_dict(
        {
            "steps": [{"channel": "telegram", "deliver_within": 30}],
            "countries": {"GB": {"telegram": {"deliver_within": "auto", "deliver_within_max": 20}}},
        }
    )
    assert fixed.steps_for("GB")[0].auto == AutoDeadline(3.0, 20.0)
    assert fixed.steps_for("DE")[0].auto is None
