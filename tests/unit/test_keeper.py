"""The keeper's health records, alert transitions and keep-alive cadence, against Secrets Manager,
DynamoDB, KMS, SNS and SQS emulated in-process (moto), the real token broker, and a provider
stand-in that issues random tokens, counts them, and fails when told to — with a clock the test
moves."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading

import boto3
import pytest
from mailbroker.errors import TokenError, classify_token_error
from mailbroker.health import HealthStore, SnsAlerts
from mailbroker.integrations import IntegrationStore, parse_integration
from mailbroker.keeper import DAY, Keeper
from mailbroker.tokens.broker import TokenBroker
from mailbroker.tokens.crypto import TokenCipher
from mailbroker.tokens.model import IssuedToken
from mailbroker.tokens.store import TokenStore
from moto import mock_aws

from mailbroker_sandbox.moto_atomic import atomic_item_writes

TABLE = "tokens"
PREFIX = "mailbroker/"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Provider:
    """Issues a fresh random token per call; ``failures[id]`` makes that integration's calls fail."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.calls: dict[str, int] = {}
        self.failures: dict[str, TokenError] = {}
        self._lock = threading.Lock()

    def fetch(self, integration) -> IssuedToken:
        with self._lock:
            self.calls[integration.id] = self.calls.get(integration.id, 0) + 1
            if integration.id in self.failures:
                raise self.failures[integration.id]
            return IssuedToken("tok-" + secrets.token_urlsafe(24), self.lifetime)


def gmail(integration_id="gmail"):
    return {
        "id": integration_id,
        "provider": "google",
        "smtp": {"host": "smtp.gmail.com"},
        "username": f"{integration_id}@gmail.example",
        "client_id": "client-1",
        "client_secret": "client-secret-value",
        "refresh_token": "1//refresh-token-value",
    }


def m365(integration_id="m365", **extra):
    return {
        "id": integration_id,
        "provider": "microsoft",
        "smtp": {"host": "smtp.office365.com"},
        "username": f"{integration_id}@contoso.example",
        "tenant_id": "contoso",
        "client_id": f"app-{integration_id}",
        "client_secret": "s3cret-value",
        **extra,
    }


class World:
    """Everything a keeper needs, on moto, with one clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.secrets = boto3.client("secretsmanager", region_name="us-east-1")
        self.db = boto3.client("dynamodb", region_name="us-east-1")
        self.db.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        kms = boto3.client("kms", region_name="us-east-1")
        self.cipher = TokenCipher(kms, kms.create_key()["KeyMetadata"]["KeyId"])
        sns = boto3.client("sns", region_name="us-east-1")
        self.topic = sns.create_topic(Name="alerts")["TopicArn"]
        self.sqs = boto3.client("sqs", region_name="us-east-1")
        self.inbox = self.sqs.create_queue(QueueName="operator")["QueueUrl"]
        inbox_arn = self.sqs.get_queue_attributes(QueueUrl=self.inbox, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        sns.subscribe(TopicArn=self.topic, Protocol="sqs", Endpoint=inbox_arn)
        self.alert_sender = SnsAlerts(sns, self.topic)
        self.store = IntegrationStore(self.secrets, PREFIX, max_age=0)
        self.health = HealthStore(self.db, TABLE)
        self.provider = Provider()

    def add(self, document: dict) -> None:
        self.store.put(parse_integration(document))

    def add_raw(self, integration_id: str, text: str) -> None:
        self.secrets.create_secret(Name=PREFIX + integration_id, SecretString=text)

    def keeper(self, **kwargs) -> Keeper:
        broker = TokenBroker(
            self.store,
            TokenStore(self.db, TABLE, self.cipher),
            self.provider,
            clock=self.clock,
            sleep=self.clock.sleep,
        )
        kwargs.setdefault("keep_alive_days", 7)
        return Keeper(self.store, broker, self.health, self.alert_sender, clock=self.clock, **kwargs)

    def alerts(self) -> list[dict]:
        found = []
        while True:
            batch = self.sqs.receive_message(QueueUrl=self.inbox, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                return found
            for message in batch:
                envelope = json.loads(message["Body"])
                attributes = {k: v["Value"] for k, v in envelope.get("MessageAttributes", {}).items()}
                found.append({"subject": envelope["Subject"], "message": envelope["Message"], **attributes})
                self.sqs.delete_message(QueueUrl=self.inbox, ReceiptHandle=message["ReceiptHandle"])


@pytest.fixture
def world():
    # The keepers of one test run on threads: moto's DynamoDB item operations are made atomic, as
    # the real service's are, or two threads could both pass one conditional write.
    with mock_aws(), atomic_item_writes():
        yield World(Clock())


def test_healthy_integration_gets_a_record_and_no_alert(world):
    world.add(m365())

    summary = world.keeper().run()

    record = world.health.get("m365")
    assert summary.to_dict() == {
        "checked": ["m365"],
        "healthy": ["m365"],
        "refreshed": ["m365"],
        "unhealthy": [],
        "alerts": 0,
    }
    assert record.healthy and record.consecutive_failures == 0
    assert record.last_success == world.clock.now
    assert record.token_expires_at == pytest.approx(world.clock.now + 3600)
    assert world.alerts() == []


def test_second_run_serves_the_prewarmed_token_without_calling_the_provider(world):
    world.add(m365())
    world.keeper().run()
    world.clock.now += 60

    summary = world.keeper().run()

    assert summary.refreshed == []
    assert world.provider.calls == {"m365": 1}


def test_refresh_token_is_exercised_after_keep_alive_days_even_while_the_access_token_is_valid(world):
    world.provider.lifetime = 10 * DAY  # an access token that outlives the keep-alive period
    world.add(gmail())
    world.keeper().run()

    world.clock.now += 7 * DAY - 60
    early = world.keeper().run()
    world.clock.now += 120
    due = world.keeper().run()

    assert early.refreshed == []
    assert due.refreshed == ["gmail"]
    assert world.provider.calls == {"gmail": 2}
    assert world.health.get("gmail").last_refresh == world.clock.now


def test_client_credentials_are_not_forced_by_the_keep_alive(world):
    world.provider.lifetime = 10 * DAY
    world.add(m365())
    world.keeper().run()

    world.clock.now += 8 * DAY
    summary = world.keeper().run()

    assert summary.refreshed == []
    assert world.provider.calls == {"m365": 1}


def test_invalid_grant_alerts_re_consent_once_with_the_command_to_run(world):
    world.add(gmail())
    world.provider.failures["gmail"] = classify_token_error(
        error="invalid_grant", description="Token has been expired or revoked.", provider="google"
    )

    first = world.keeper().run()
    world.clock.now += 3600
    second = world.keeper().run()

    alerts = world.alerts()
    assert first.unhealthy == second.unhealthy == ["gmail"]
    assert [a["kind"] for a in alerts] == ["reconsent"]
    assert "re-consent needed: mailbroker consent google gmail" in alerts[0]["message"].lower()
    assert alerts[0]["command"] == "mailbroker consent google gmail"
    record = world.health.get("gmail")
    assert record.last_error.code == "token_invalid_grant"
    assert record.consecutive_failures == 2


def test_failure_and_recovery_each_alert_exactly_once(world):
    world.add(m365())
    world.keeper().run()
    world.provider.failures["m365"] = classify_token_error(status=503, provider="microsoft")
    world.clock.now += 3 * 3600  # the cached token has expired: the provider is asked

    for _ in range(3):
        world.keeper().run()
        world.clock.now += 3600
    del world.provider.failures["m365"]
    world.keeper().run()
    world.clock.now += 3600
    world.keeper().run()

    assert [a["kind"] for a in world.alerts()] == ["unhealthy", "recovered"]
    record = world.health.get("m365")
    assert record.healthy and record.consecutive_failures == 0 and record.last_error is None


def test_unhealthy_alert_names_the_code_and_the_hint(world):
    world.add(m365())
    world.provider.failures["m365"] = classify_token_error(
        error="invalid_client",
        error_codes=[7000215],
        description="Invalid client secret",
        provider="microsoft",
    )

    world.keeper().run()

    (alert,) = world.alerts()
    assert alert["kind"] == "unhealthy" and alert["code"] == "token_invalid_client"
    assert "AADSTS7000215" in alert["message"]  # the catalogue's hint
    assert "mailbroker doctor m365" in alert["message"]


def test_secret_about_to_expire_is_warned_once_per_expiry_date(world):
    world.add(m365(client_secret_expires_at="2027-01-15T00:00:00Z"))
    world.clock.now = dt.datetime(2026, 12, 17, tzinfo=dt.UTC).timestamp()

    world.keeper().run()
    world.clock.now += 3600
    world.keeper().run()
    world.add(m365(client_secret_expires_at="2027-01-16"))  # renewed, but still inside the window
    world.clock.now += 3600
    world.keeper().run()

    alerts = world.alerts()
    assert [(a["kind"], a["expires_at"]) for a in alerts] == [
        ("secret_expiring", "2027-01-15T00:00:00Z"),
        ("secret_expiring", "2027-01-16"),
    ]
    record = world.health.get("m365")
    assert record.healthy
    assert record.warnings == ("The client secret expires on 2027-01-16 (in 29 days).",)


def test_secret_far_from_expiry_raises_no_warning(world):
    world.add(m365(client_secret_expires_at="2029-01-01"))

    world.keeper().run()

    assert world.alerts() == []
    assert world.health.get("m365").warnings == ()


def test_one_broken_integration_never_stops_the_others(world):
    world.add(m365("a"))
    world.add_raw("b", "{not json")
    world.add(gmail("c"))
    world.provider.failures["c"] = classify_token_error(status=None, description="ConnectTimeout")

    summary = world.keeper().run()

    assert summary.checked == ["a", "b", "c"]
    assert summary.healthy == ["a"]
    assert summary.unhealthy == ["b", "c"]
    assert world.health.get("b").last_error.code == "invalid_integration"
    assert world.health.get("c").last_error.code == "token_unavailable"


def test_two_keepers_running_at_once_announce_a_transition_once(world):
    for name in ("x1", "x2", "x3"):
        world.add(gmail(name))
        world.provider.failures[name] = classify_token_error(error="invalid_grant", provider="google")
    keepers = [world.keeper(), world.keeper()]
    barrier = threading.Barrier(2)

    def run(keeper):
        barrier.wait()
        keeper.run()

    threads = [threading.Thread(target=run, args=(k,)) for k in keepers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    kinds = sorted((a["integration"], a["kind"]) for a in world.alerts())
    assert kinds == [("x1", "reconsent"), ("x2", "reconsent"), ("x3", "reconsent")]


def test_records_and_alerts_never_hold_a_credential(world):
    world.add(gmail())
    world.provider.failures["gmail"] = classify_token_error(
        error="invalid_grant", description="refresh 1//refresh-token-value is revoked", provider="google"
    )

    world.keeper().run()

    stored = json.dumps(world.db.scan(TableName=TABLE)["Items"])
    alerts = json.dumps(world.alerts())
    for secret in ("1//refresh-token-value", "client-secret-value"):
        assert secret not in stored
        assert secret not in alerts


def test_live_smtp_check_failure_makes_the_integration_unhealthy(world):
    from mailbroker.smtp import CheckStep

    world.add(m365(smtp_check=True))
    refused = CheckStep(
        "auth", False, "auth: 535 5.7.139 Authentication unsuccessful", "smtp_auth_disabled", None
    )

    world.keeper(smtp_check=lambda integration: [CheckStep("connect", True, "ok"), refused]).run()

    record = world.health.get("m365")
    assert not record.healthy and record.smtp_checked
    assert record.last_error.code == "smtp_auth_disabled"
    assert "Set-CASMailbox" in record.last_error.hint


def test_certificate_is_warned_thirty_days_before_its_own_not_after(world):
    import time

    from mailbroker_cli.certificates import self_signed

    key, cert = self_signed("mailbroker m365-cert", days=20)
    document = m365("m365-cert")
    del document["client_secret"]
    world.add(document | {"client_certificate": {"private_key": key, "certificate": cert}})
    world.clock.now = time.time()

    world.keeper().run()
    world.keeper().run()

    (alert,) = world.alerts()
    assert alert["kind"] == "secret_expiring"
    assert "client certificate of m365-cert expires" in alert["subject"]
    assert "mailbroker cert create m365-cert" in alert["message"]
    assert key not in json.dumps(alert)
    assert world.health.get("m365-cert").warnings[0].startswith("The client certificate expires on")
