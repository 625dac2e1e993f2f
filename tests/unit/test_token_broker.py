"""The token broker's cache levels, refresh-ahead, expiry checks, encryption at rest and failure
handling, against DynamoDB and KMS emulated in-process (moto) and a provider stand-in that issues
real random tokens and counts them."""

from __future__ import annotations

import secrets
import threading

import boto3
import pytest
from mailbroker.errors import TokenError, TokenUnavailable
from mailbroker.integrations import parse_integration
from mailbroker.tokens.broker import TokenBroker
from mailbroker.tokens.crypto import TokenCipher
from mailbroker.tokens.model import IssuedToken, RefreshPolicy
from mailbroker.tokens.providers import identity_of
from mailbroker.tokens.store import TokenStore
from moto import mock_aws

TABLE = "tokens"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class CountingProvider:
    """Issues a fresh random token per call with the configured lifetime; can be told to fail."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.issued: list[str] = []
        self.failure: TokenError | None = None
        self._lock = threading.Lock()

    def fetch(self, integration) -> IssuedToken:
        with self._lock:
            self.calls += 1
            if self.failure:
                raise self.failure
            token = "tok-" + secrets.token_urlsafe(24)
            self.issued.append(token)
            return IssuedToken(token, self.lifetime)


class OneIntegration:
    def __init__(self, integration) -> None:
        self.integration = integration

    def get(self, integration_id):
        return self.integration


def microsoft(username="support@contoso.com", client_id="app-1"):
    return parse_integration(
        {
            "id": "m365",
            "provider": "microsoft",
            "smtp": {"host": "smtp.office365.com"},
            "username": username,
            "tenant_id": "contoso",
            "client_id": client_id,
            "client_secret": "s3cret-value",
        }
    )


@pytest.fixture
def aws():
    with mock_aws():
        db = boto3.client("dynamodb", region_name="us-east-1")
        db.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        kms = boto3.client("kms", region_name="us-east-1")
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        yield db, kms, key_id


@pytest.fixture
def clock():
    return Clock()


def make_broker(aws, clock, provider, integration=None, **kwargs):
    db, kms, key_id = aws
    store = TokenStore(db, TABLE, TokenCipher(kms, key_id))
    return TokenBroker(
        OneIntegration(integration or microsoft()),
        store,
        provider,
        clock=clock,
        sleep=clock.sleep,
        **kwargs,
    )


def test_first_request_fetches_from_provider_then_memory_serves_it(aws, clock):
    provider = CountingProvider()
    broker = make_broker(aws, clock, provider)

    first = broker.token_for("m365")
    second = broker.token_for("m365")

    assert (first.source, second.source) == ("provider", "memory")
    assert first.access_token == second.access_token == provider.issued[0]
    assert provider.calls == 1


def test_second_environment_is_served_from_dynamodb_without_calling_provider(aws, clock):
    provider = CountingProvider()
    make_broker(aws, clock, provider).token_for("m365")

    other_environment = make_broker(aws, clock, provider)
    answer = other_environment.token_for("m365")

    assert answer.source == "cache"
    assert answer.access_token == provider.issued[0]
    assert provider.calls == 1


def test_expires_at_uses_the_lifetime_the_provider_returned(aws, clock):
    provider = CountingProvider(lifetime=1799)
    answer = make_broker(aws, clock, provider).token_for("m365")
    assert answer.expires_at == pytest.approx(clock.now + 1799)


def test_token_is_refreshed_ahead_when_less_than_the_margin_remains(aws, clock):
    provider = CountingProvider(lifetime=3600)
    broker = make_broker(aws, clock, provider)
    broker.token_for("m365")

    clock.now += 3600 - 601  # 601 s left: still fresh (margin is max(600, 15% of 3600 = 540))
    assert broker.token_for("m365").source == "memory"
    clock.now += 2  # 599 s left: due
    refreshed = broker.token_for("m365")

    assert refreshed.source == "provider"
    assert provider.calls == 2
    assert refreshed.access_token == provider.issued[1]


def test_margin_is_fifteen_percent_of_a_long_lifetime():
    from mailbroker.tokens.model import CachedToken

    policy = RefreshPolicy()
    token = CachedToken("x", issued_at=0, expires_at=86400)
    assert policy.refresh_at(token) == pytest.approx(86400 * 0.85)


def test_short_lived_token_is_not_refreshed_on_every_call():
    from mailbroker.tokens.model import CachedToken

    policy = RefreshPolicy()  # a 10-minute minimum margin must not swallow a 5-minute token
    token = CachedToken("x", issued_at=0, expires_at=300)
    assert policy.is_fresh(token, 100)
    assert not policy.is_fresh(token, 151)


def test_every_read_checks_expiry_itself_even_when_the_item_is_still_in_the_table(aws, clock):
    provider = CountingProvider(lifetime=3600)
    make_broker(aws, clock, provider).token_for("m365")

    clock.now += 7200  # long expired; DynamoDB TTL has not deleted the item yet
    answer = make_broker(aws, clock, provider).token_for("m365")

    assert answer.source == "provider"
    assert answer.expires_at > clock.now
    assert provider.calls == 2


def test_stored_item_holds_no_usable_token(aws, clock):
    db, _, _ = aws
    provider = CountingProvider()
    make_broker(aws, clock, provider).token_for("m365")

    (item,) = db.scan(TableName=TABLE)["Items"]
    raw = repr(item).encode()
    token = provider.issued[0].encode()
    assert token not in raw
    assert token not in item["ct"]["B"]
    assert "access_token" not in item


def test_ciphertext_is_bound_to_its_credential(aws, clock):
    db, kms, key_id = aws
    provider = CountingProvider()
    make_broker(aws, clock, provider).token_for("m365")
    (item,) = db.scan(TableName=TABLE)["Items"]

    from cryptography.exceptions import InvalidTag
    from mailbroker.tokens.crypto import Sealed

    sealed = Sealed(item["ct"]["B"], item["nonce"]["B"], item["edk"]["B"])
    cipher = TokenCipher(kms, key_id)
    assert cipher.open(sealed, item["pk"]["S"].encode()).decode() == provider.issued[0]
    with pytest.raises(InvalidTag):
        cipher.open(sealed, b"token#another-credential")


def test_two_mailboxes_of_one_app_never_share_a_token(aws, clock):
    provider = CountingProvider()
    a = make_broker(aws, clock, provider, integration=microsoft("a@contoso.com")).token_for("m365")
    b = make_broker(aws, clock, provider, integration=microsoft("b@contoso.com")).token_for("m365")

    assert a.access_token != b.access_token
    assert identity_of(microsoft("a@contoso.com")).key != identity_of(microsoft("b@contoso.com")).key
    assert provider.calls == 2


def test_rejected_token_is_replaced_once_and_never_handed_out_again(aws, clock):
    provider = CountingProvider()
    broker = make_broker(aws, clock, provider)
    refused = broker.token_for("m365").access_token

    fresh = broker.token_for("m365", rejected_token=refused)
    again = make_broker(aws, clock, provider).token_for("m365", rejected_token=refused)

    assert fresh.source == "provider" and fresh.access_token != refused
    assert again.access_token == fresh.access_token  # a second environment reporting the same refusal
    assert provider.calls == 2


def test_force_refresh_does_not_replace_a_token_issued_seconds_ago(aws, clock):
    provider = CountingProvider()
    broker = make_broker(aws, clock, provider)
    broker.token_for("m365")

    assert broker.token_for("m365", force_refresh=True).source == "memory"
    clock.now += 60
    assert broker.token_for("m365", force_refresh=True).source == "provider"
    assert provider.calls == 2


def test_caller_keeps_the_old_token_while_another_environment_holds_the_lease(aws, clock):
    provider = CountingProvider(lifetime=3600)
    make_broker(aws, clock, provider).token_for("m365")
    clock.now += 3100  # due for refresh, still valid for 500 s
    key = identity_of(microsoft()).key
    holder = make_broker(aws, clock, provider)
    state = holder.store.read(key)
    assert holder.store.try_lease(key, "someone-else", now=clock.now, ttl=15, seen_version=state.version)

    answer = make_broker(aws, clock, provider).token_for("m365")

    assert answer.source == "cache"
    assert answer.access_token == provider.issued[0]
    assert provider.calls == 1


def test_waiting_caller_gets_the_new_token_when_the_lease_holder_stores_it(aws, clock):
    provider = CountingProvider()
    key = identity_of(microsoft()).key
    holder = make_broker(aws, clock, provider)
    assert holder.store.try_lease(key, "holder", now=clock.now, ttl=15, seen_version=None)
    from mailbroker.tokens.model import CachedToken

    waiter = make_broker(aws, clock, provider)
    stored = CachedToken("tok-from-holder", issued_at=clock.now, expires_at=clock.now + 3600)

    def store_during_wait(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 1_000_000.1:
            holder.store.save(key, "holder", stored)

    waiter._sleep = store_during_wait
    answer = waiter.token_for("m365")

    assert answer.access_token == "tok-from-holder"
    assert provider.calls == 0


def test_lease_of_a_dead_holder_expires_and_another_caller_refreshes(aws, clock):
    provider = CountingProvider()
    key = identity_of(microsoft()).key
    broker = make_broker(aws, clock, provider, lease_ttl=15, lease_wait=30)
    assert broker.store.try_lease(key, "crashed-environment", now=clock.now, ttl=15, seen_version=None)

    answer = broker.token_for("m365")

    assert answer.source == "provider"
    assert provider.calls == 1


def test_caller_gives_up_with_token_unavailable_when_no_token_arrives(aws, clock):
    provider = CountingProvider()
    key = identity_of(microsoft()).key
    broker = make_broker(aws, clock, provider, lease_ttl=15, lease_wait=2)
    assert broker.store.try_lease(key, "slow-holder", now=clock.now, ttl=60, seen_version=None)

    with pytest.raises(TokenUnavailable) as caught:
        broker.token_for("m365")

    assert caught.value.retryable
    assert provider.calls == 0


def test_retry_after_is_honoured_by_every_environment(aws, clock):
    provider = CountingProvider()
    provider.failure = TokenUnavailable("throttled", retry_after=30)
    with pytest.raises(TokenUnavailable):
        make_broker(aws, clock, provider).token_for("m365")

    clock.now += 10
    with pytest.raises(TokenError) as caught:
        make_broker(aws, clock, provider).token_for("m365")
    assert caught.value.code == "token_unavailable"
    assert caught.value.retry_after == pytest.approx(20, abs=0.01)
    assert provider.calls == 1

    clock.now += 21
    provider.failure = None
    assert make_broker(aws, clock, provider).token_for("m365").source == "provider"
    assert provider.calls == 2


def test_permanent_failure_is_answered_from_the_hold_without_calling_again(aws, clock):
    provider = CountingProvider()
    provider.failure = TokenError(
        "invalid_grant: Token has been expired or revoked.", code="token_invalid_grant"
    )
    with pytest.raises(TokenError):
        make_broker(aws, clock, provider).token_for("m365")

    with pytest.raises(TokenError) as caught:
        make_broker(aws, clock, provider).token_for("m365")

    assert caught.value.code == "token_invalid_grant"
    assert not caught.value.retryable
    assert provider.calls == 1


def test_basic_integration_has_no_token(aws, clock):
    basic = parse_integration(
        {
            "id": "relay",
            "provider": "basic",
            "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"},
            "username": "app@example.com",
            "password": "pw",
        }
    )
    with pytest.raises(Exception) as caught:
        make_broker(aws, clock, CountingProvider(), integration=basic).token_for("relay")
    assert caught.value.code == "invalid_integration"


def test_threads_of_one_environment_share_one_refresh(aws, clock):
    provider = CountingProvider()
    broker = make_broker(aws, clock, provider)
    results = []
    threads = [threading.Thread(target=lambda: results.append(broker.token_for("m365"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert provider.calls == 1
    assert len({r.access_token for r in results}) == 1


def test_a_token_the_provider_issued_is_returned_even_when_dynamodb_cannot_store_it(aws, clock):
    from mailbroker.errors import AwsUnavailable

    provider = CountingProvider()
    broker = make_broker(aws, clock, provider)

    def unavailable(*args, **kwargs):
        raise AwsUnavailable("DynamoDB UpdateItem failed: ProvisionedThroughputExceededException")

    broker.store.save = unavailable

    answer = broker.token_for("m365")

    assert answer.source == "provider"
    assert answer.access_token == provider.issued[0]
    assert broker.token_for("m365").source == "memory"
