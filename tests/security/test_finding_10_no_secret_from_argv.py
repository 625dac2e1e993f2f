"""Finding 10: ``integration add --password literal`` stored a secret taken from the command line,
where the process list and shell history show it. Secrets now come from stdin, a file or a prompt
only; a literal is refused and nothing is written. Runs against Secrets Manager on moto server."""

from __future__ import annotations

import io
import secrets

import pytest
from mailbroker import runtime
from mailbroker.integrations import IntegrationStore

from mailbroker_cli.main import main
from mailbroker_sandbox.aws import provision

BASIC = ["--provider", "basic", "--username", "alerts@relay.example", "--smtp-host", "smtp.relay.example"]


@pytest.fixture
def store(moto_server, template, aws_env, monkeypatch):
    stack = provision(
        template,
        endpoint_url=moto_server.endpoint_url,
        parameters={"SecretPrefix": f"f10-{secrets.token_hex(4)}/"},
    )
    for name, value in stack.function_env("KeeperFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_COLOR", "1")
    runtime.reset()
    yield IntegrationStore(stack.client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0)
    stack.delete()
    runtime.reset()


@pytest.mark.parametrize(
    "argv",
    [
        ["--password", "hunter2-literal"],
        ["--password=hunter2-literal"],
    ],
)
def test_finding_10_a_password_on_the_command_line_is_refused_and_nothing_is_written(store, capsys, argv):
    code = main(["integration", "add", "relay", *BASIC, *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert "--password takes '-'" in err and "--password-file" in err
    assert "hunter2-literal" not in err
    assert store.list_ids() == []


@pytest.mark.parametrize("flag", ["--client-secret", "--refresh-token"])
def test_finding_10_every_secret_flag_refuses_a_literal(store, capsys, flag):
    code = main(["integration", "add", "g", "--provider", "google", "--username", "a@example.com",
                 "--client-id", "c", flag, "literal-secret-value"])  # fmt: skip

    assert code == 2 and f"{flag} takes '-'" in capsys.readouterr().err
    assert store.list_ids() == []


def test_finding_10_the_password_comes_from_a_file(store, tmp_path):
    (tmp_path / "password").write_text("from-a-file\n")

    code = main(["integration", "add", "relay", *BASIC, "--password-file", str(tmp_path / "password")])

    assert code == 0
    assert store.get("relay").password.get_secret_value() == "from-a-file"


def test_finding_10_the_password_comes_from_stdin(store, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))

    code = main(["integration", "add", "relay", *BASIC, "--password", "-"])

    assert code == 0
    assert store.get("relay").password.get_secret_value() == "from-stdin"


def test_finding_10_consent_refuses_a_client_secret_on_the_command_line(store, capsys):
    code = main(["consent", "google", "g", "--client-id", "c", "--client-secret", "literal-secret",
                 "--username", "a@example.com", "--no-browser"])  # fmt: skip

    assert code == 2 and "--client-secret takes '-'" in capsys.readouterr().err
    assert store.list_ids() == []
