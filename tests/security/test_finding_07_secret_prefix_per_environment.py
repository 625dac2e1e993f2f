"""Finding 7: dev and prod shared one integration namespace.

Both samconfig.toml environments resolved ``SecretPrefix`` to ``mailbroker/``, so a dev stack at
DEBUG listed, refreshed and sent as prod's mailboxes; and ``AllowedPattern`` accepted a prefix
without its trailing ``/``, whose ``${SecretPrefix}*`` grant and ListSecrets filter take in every
secret that merely starts with it. Secrets Manager on moto server shows what a prefix reaches.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from mailbroker.integrations import IntegrationStore, parse_integration

from mailbroker_sandbox.aws import load_template

ROOT = Path(__file__).resolve().parents[2]
PATTERN = load_template(ROOT / "template.yaml")["Parameters"]["SecretPrefix"]["AllowedPattern"]


def deploy_prefixes() -> dict[str, str]:
    """SecretPrefix per samconfig.toml environment (the template default where none is given)."""
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    prefixes = {}
    for environment, commands in config.items():
        if not isinstance(commands, dict) or "deploy" not in commands:
            continue
        overrides = dict(
            item.split("=", 1)
            for item in shlex.split(commands["deploy"]["parameters"]["parameter_overrides"])
        )
        prefixes[environment] = overrides.get("SecretPrefix", "mailbroker/")
    return prefixes


def test_finding_7_each_samconfig_environment_has_its_own_secret_prefix():
    prefixes = deploy_prefixes()
    by_stage = {"dev": prefixes["dev"], "prod": prefixes["prod"]}

    assert prefixes["default"] == prefixes["dev"]  # `sam deploy` without --config-env is dev
    assert by_stage["dev"] != by_stage["prod"]
    for one in by_stage.values():
        for other in by_stage.values():
            assert one == other or not other.startswith(one)  # neither grants the other's secrets
        assert re.fullmatch(PATTERN, one)


@pytest.mark.parametrize("prefix", ["mailbroker", "mailbroker*", "", "/", "mailbroker/x"])
def test_finding_7_a_prefix_without_its_trailing_slash_is_refused(prefix):
    assert not re.fullmatch(PATTERN, prefix)


@pytest.mark.parametrize("prefix", ["mailbroker/", "mailbroker-dev/", "mailbroker-prod/", "team/mailbroker/"])
def test_finding_7_ordinary_prefixes_are_accepted(prefix):
    assert re.fullmatch(PATTERN, prefix)


def _integration(integration_id: str) -> object:
    return parse_integration(
        {
            "id": integration_id,
            "provider": "basic",
            "smtp": {"host": "smtp.example.com"},
            "username": "a@example.com",
            "password": "p",
        }
    )


def test_finding_7_dev_does_not_see_prods_integrations(stack):
    client = stack.client("secretsmanager")
    prefixes = deploy_prefixes()
    uid = stack.parameters["SecretPrefix"].strip("/")
    dev = IntegrationStore(client, f"{uid}-{prefixes['dev']}", max_age=0)
    prod = IntegrationStore(client, f"{uid}-{prefixes['prod']}", max_age=0)
    prod.put(_integration("billing"))
    try:
        assert dev.list_ids() == []
        assert prod.list_ids() == ["billing"]
        # What the slash prevents: a prefix without it lists the other environment's secrets.
        unslashed = IntegrationStore(client, f"{uid}-{prefixes['dev']}".split("-dev/")[0], max_age=0)
        assert unslashed.list_ids() != []
    finally:
        prod.delete("billing")
