"""The fault matrix: every fault the token endpoint, the SMTP server or AWS can throw at a batch,
and where each message of the batch ends — ``sent`` exactly once (counted at the server),
``retrying`` with the right delay (still on the queue), or ``failed`` with the right code in the
dead-letter queue. None vanishes: ``assert_accounted`` checks every posted message against the
server, its status record, the dead-letter queue and the queue's own counts after each case.

Real peers on loopback (the template's queues and tables on moto server, the sandbox token
endpoints and SMTP server); AWS faults are error replies injected into the handler's own boto3
clients, as the services give them once the SDK's retries are spent. "Time passing" between
rounds makes retried messages visible at once; the delays asked for are checked, not waited.
"""

from __future__ import annotations

import threading

import pytest
from mailbroker import runtime

FIRST_RETRY = range(54, 67)  # the schedule's first step: 60 s ± 10 %


def assert_accounted(pipeline) -> dict[str, str]:
    """Every posted message is in exactly one place; returns each id's final state."""
    letters = pipeline.dead_letters()
    states: dict[str, str] = {}
    for message_id in dict.fromkeys(pipeline.posted):
        outcome = pipeline.outcome(message_id)
        if outcome.state == "sent":
            assert outcome.deliveries == 1, f"{message_id} delivered {outcome.deliveries} times"
            assert message_id not in letters
        elif outcome.state == "failed":
            assert message_id in letters, f"{message_id} failed without a dead letter"
            # delivery_uncertain: the server may or may not have it; it was not sent again
            uncertain = outcome.code == "delivery_uncertain"
            assert outcome.deliveries in ((0, 1) if uncertain else (0,))
        else:
            assert outcome.deliveries == 0, f"{message_id} delivered but recorded {outcome.state}"
            assert message_id not in letters
        states[message_id] = outcome.state or "on the queue, no record"
    waiting = sum(1 for s in states.values() if s not in ("sent", "failed"))
    assert sum(pipeline.queue_depth()) == waiting, "a message vanished from the queue"
    return states


def post_batch(pipeline, integration_id, count=2):
    ids = []
    for _ in range(count):
        message = pipeline.message(integration_id)
        pipeline.post(message)
        ids.append(message["id"])
    return ids


def assert_retrying(pipeline, ids, code, delays=FIRST_RETRY):
    for message_id in ids:
        status = pipeline.status(message_id)
        assert status["status"] == "retrying", status
        assert status["last_error"]["code"] == code
    assert pipeline.delays(), "no delay was set"
    assert all(d in delays for d in pipeline.delays()), pipeline.delays()


def assert_sent_once(pipeline, ids):
    states = assert_accounted(pipeline)
    assert [states[i] for i in ids] == ["sent"] * len(ids)


def assert_failed(pipeline, ids, code):
    states = assert_accounted(pipeline)
    letters = pipeline.dead_letters()
    for message_id in ids:
        assert states[message_id] == "failed"
        assert pipeline.status(message_id)["last_error"]["code"] == code
        assert letters[message_id]["error_code"] == code


# ---------------------------------------------------------------- token endpoint


def test_token_endpoint_500_retries_the_batch_after_a_minute_then_sends_each_once(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.tokens.fail_next("500")

    p.round()

    assert_retrying(p, ids, "token_unavailable")
    assert p.tokens.requests == 1  # the batch's second message did not ask again
    p.new_environment()  # a minute later: MSAL no longer replays the error it cached for 5 s
    p.drive()
    assert_sent_once(p, ids)


def test_token_endpoint_429_holds_every_environment_off_for_its_retry_after(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.tokens.fail_next("429", retry_after=90)

    p.round()
    p.new_environment()  # another sender environment takes the next attempt
    p.pass_time()
    p.round()

    first, second = p.delays()[:2], p.delays()[2:]
    assert all(d in range(90, 100) for d in first)  # Retry-After, longer than the first step
    assert all(d in range(270, 331) for d in second)  # answered from the hold: the second step
    assert_retrying(p, ids, "token_unavailable", delays=range(90, 331))
    assert p.tokens.requests == 1
    assert set(assert_accounted(p).values()) == {"retrying"}


def test_token_endpoint_timeout_retries_then_sends_each_once(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.tokens.fail_next("timeout", delay=2)

    p.round()

    assert_retrying(p, ids, "token_unavailable")
    p.drive()
    assert_sent_once(p, ids)


def test_invalid_grant_fails_the_batch_for_reconsent_without_retrying(mail_pipeline):
    p = mail_pipeline
    integration = p.add("google")
    ids = post_batch(p, integration)
    p.tokens.fail_next("invalid_grant")

    p.drive()

    assert_failed(p, ids, "token_invalid_grant")
    assert p.tokens.requests == 1
    assert p.delays() == []


def test_invalid_client_fails_the_batch_without_retrying(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.tokens.fail_next("invalid_client")

    p.drive()

    assert_failed(p, ids, "token_invalid_client")
    assert p.delays() == []


# ---------------------------------------------------------------- SMTP


def test_421_at_greeting_slows_the_mailbox_down_retries_then_sends_each_once(mail_pipeline):
    p = mail_pipeline
    integration = p.add("microsoft")
    ids = post_batch(p, integration)
    p.smtp.fail("greeting", 421, "4.3.2 Service not available, closing transmission channel")

    failed = p.round()

    assert len(failed) == 2
    assert p.status(ids[0])["last_error"]["code"] == "throttled"
    assert slow_until(p, integration) > 0
    p.drive()
    assert_sent_once(p, ids)


def test_tls_handshake_failure_fails_the_batch_before_any_credential_is_sent(mail_pipeline):
    p = mail_pipeline
    integration = p.add("microsoft", smtp={"security": "tls"})  # implicit TLS to a plaintext greeting
    ids = post_batch(p, integration)

    p.drive()

    assert_failed(p, ids, "tls_failed")
    assert p.smtp.auth_attempts == 0


def test_untrusted_certificate_fails_the_batch_before_any_credential_is_sent(mail_pipeline, smtp_server):
    p = mail_pipeline
    impostor = p.server(trusted_cert=False)
    impostor.add_mailbox("support@contoso.com")
    ids = post_batch(p, p.add("microsoft", smtp={"port": impostor.port}))

    p.drive()

    assert_failed(p, ids, "tls_failed")
    assert impostor.auth_attempts == 0
    assert p.gate.presented == []


def test_432_after_auth_throttles_the_mailbox_and_the_rest_of_the_batch_waits_without_an_attempt(
    mail_pipeline,
):
    p = mail_pipeline
    integration = p.add("microsoft")
    ids = post_batch(p, integration)
    p.smtp.fail("mail", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")

    failed = p.round()

    assert len(failed) == 2
    first, second = (p.status(i) for i in ids)
    assert first["status"] == "retrying" and first["last_error"]["code"] == "throttled"
    assert second is None or second["attempts"] == 0  # put back, not counted
    assert slow_until(p, integration) > 0
    p.drive()
    assert_sent_once(p, ids)


def test_535_once_is_answered_with_one_fresh_token_and_the_batch_is_sent(mail_pipeline):
    p = mail_pipeline
    integration = p.add("microsoft")
    ids = post_batch(p, integration)
    p.smtp.fail("auth", 535, "5.7.3 Authentication unsuccessful")

    failed = p.round()

    assert failed == []
    assert_sent_once(p, ids)
    assert p.tokens.issued(client_id=p.client_id(integration)) == 2


def test_535_twice_fails_the_batch_as_smtp_auth_failed_after_one_fresh_token(mail_pipeline):
    p = mail_pipeline
    integration = p.add("microsoft")
    ids = post_batch(p, integration)
    p.smtp.fail("auth", 535, "5.7.3 Authentication unsuccessful", times=2)

    p.drive()

    assert_failed(p, ids, "smtp_auth_failed")
    assert p.tokens.issued(client_id=p.client_id(integration)) == 2


def test_gmail_334_json_challenge_then_535_gets_one_fresh_token_and_the_batch_is_sent(
    mail_pipeline, smtp_server
):
    p = mail_pipeline
    gmail = p.server(gmail_style=True)
    integration = p.add("google", smtp={"port": gmail.port})
    gmail.add_mailbox("support@contoso.com")
    ids = post_batch(p, integration)
    p.gate.refuse = 1  # the cached token was revoked behind our back

    failed = p.round()

    assert failed == []
    assert [gmail.accepted[i].auth_user for i in range(2)] == ["support@contoso.com"] * 2
    assert len(set(p.gate.presented)) == 2
    for message_id in ids:
        assert p.status(message_id)["status"] == "sent"


def test_gmail_334_json_challenge_for_the_fresh_token_too_fails_the_batch(mail_pipeline, smtp_server):
    p = mail_pipeline
    gmail = p.server(gmail_style=True)
    integration = p.add("google", smtp={"port": gmail.port})
    gmail.add_mailbox("support@contoso.com")
    ids = post_batch(p, integration)
    p.gate.refuse = 2

    p.drive()

    assert_failed(p, ids, "smtp_auth_failed")
    assert gmail.accepted == []


def test_451_after_mail_retries_that_message_after_a_minute_then_sends_each_once(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.smtp.fail("mail", 451, "4.3.0 Mail server temporarily rejected message")

    failed = p.round()

    assert len(failed) == 1
    assert_retrying(p, [i for i in ids if p.status(i)["status"] != "sent"], "smtp_transient")
    p.drive()
    assert_sent_once(p, ids)


def test_550_for_one_of_two_recipients_sends_once_to_the_other_and_records_the_refusal(mail_pipeline):
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft"), count=1)
    p.smtp.fail("rcpt", 550, "5.1.1 User unknown", recipient="bo@example.com")

    p.drive()

    assert_sent_once(p, [message_id])
    assert p.smtp.accepted[0].rcpt_tos == ["ana@example.com"]
    [refused] = p.status(message_id)["refused"]
    assert refused["recipient"] == "bo@example.com" and refused["reply"].startswith("550")


def test_552_size_fails_the_message_as_too_large(mail_pipeline):
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft"), count=1)
    p.smtp.fail("eod", 552, "5.3.4 Message size exceeds fixed maximum message size")

    p.drive()

    assert_failed(p, [message_id], "message_too_large")


def test_disconnect_mid_data_after_the_whole_body_was_written_is_uncertain_until_an_operator_redrives_it(
    mail_pipeline,
):
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft"), count=1)
    p.smtp.fail("disconnect_mid_data")

    p.drive()

    # The body and its final dot were already in the socket when the server hung up: from the
    # client's side this is indistinguishable from a loss after end-of-data.
    assert_failed(p, [message_id], "delivery_uncertain")
    assert p.delivered(message_id) == 0
    p.redrive(message_id)  # the operator checked the mailbox: it is not there
    p.drive()
    assert_sent_once(p, [message_id])


def test_disconnect_after_end_of_data_is_delivery_uncertain_and_never_resent(mail_pipeline):
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft"), count=1)
    p.smtp.fail("disconnect_after_eod")

    p.drive()

    assert_failed(p, [message_id], "delivery_uncertain")
    assert p.delivered(message_id) == 1  # the server did take it: resending would duplicate
    p.drive()
    assert p.delivered(message_id) == 1


def test_server_slower_than_the_timeout_retries_the_message_and_it_arrives_once(mail_pipeline):
    # A server that offers only DATA: the body waits for the envelope's replies, so a timeout
    # before them leaves nothing sent and the message is safely retried.
    p = mail_pipeline
    data_only = p.server(chunking=False)
    integration = p.add("microsoft", smtp={"timeout_seconds": 0.5, "port": data_only.port})
    data_only.add_mailbox("support@contoso.com")
    [message_id] = post_batch(p, integration, count=1)
    data_only.fail("slow", text="mail", delay=1.5)

    p.round()

    assert_retrying(p, [message_id], "smtp_transient")
    p.drive()
    assert p.delivered(message_id) == 1
    assert_sent_once(p, [message_id])


def test_a_timeout_after_a_pipelined_bdat_body_is_uncertain_and_never_resent(mail_pipeline):
    # With CHUNKING the body goes out with the envelope: a server slower than the timeout may
    # still take it, so the outcome is delivery_uncertain, never a second copy.
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft", smtp={"timeout_seconds": 0.5}), count=1)
    p.smtp.fail("slow", text="mail", delay=1.5)

    p.round()
    p.drive()

    assert_failed(p, [message_id], "delivery_uncertain")
    assert p.delivered(message_id) <= 1


# ---------------------------------------------------------------- AWS


def test_dynamodb_throttling_puts_the_batch_back_and_it_is_sent_once_later(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.fail_aws("dynamodb", "GetItem", "ProvisionedThroughputExceededException", times=4)
    p.fail_aws("dynamodb", "UpdateItem", "ProvisionedThroughputExceededException", times=4)

    failed = p.round()

    assert len(failed) == 2
    assert all(d in FIRST_RETRY for d in p.delays())
    assert set(assert_accounted(p).values()) <= {"retrying", "on the queue, no record"}
    p.drive()
    assert_sent_once(p, ids)


def test_racing_copies_of_one_id_are_delivered_once(mail_pipeline):
    p = mail_pipeline
    message = p.message(p.add("microsoft"))
    for _ in range(3):
        p.post(message)  # the application retried its SendMessage; SQS holds three copies
    events = [p.receive(1) for _ in range(3)]
    start = threading.Barrier(3)

    def invocation(event):
        start.wait()
        p.run(event)

    threads = [threading.Thread(target=invocation, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.drive()

    assert_sent_once(p, [message["id"]])


def test_secrets_manager_unavailable_retries_the_batch_then_sends_each_once(mail_pipeline):
    p = mail_pipeline
    ids = post_batch(p, p.add("microsoft"))
    p.fail_aws("secretsmanager", "GetSecretValue", "InternalServiceError", status=500, times=2)

    p.round()

    assert_retrying(p, ids, "aws_unavailable")
    p.drive()
    assert_sent_once(p, ids)


def test_failing_visibility_change_leaves_the_message_on_the_queue_not_lost(mail_pipeline):
    p = mail_pipeline
    [message_id] = post_batch(p, p.add("microsoft"), count=1)
    p.smtp.fail("mail", 451, "4.3.0 Mail server temporarily rejected message")
    p.fail_aws("sqs", "ChangeMessageVisibility", "InternalError", status=500)

    failed = p.round()

    assert len(failed) == 1
    assert p.status(message_id)["status"] == "retrying"
    assert p.queue_depth() == (0, 1)  # back after the queue's own visibility timeout
    p.drive()
    assert_sent_once(p, [message_id])


def slow_until(pipeline, integration_id) -> float:
    item = runtime.aws_client("dynamodb").get_item(
        TableName=pipeline.env["MESSAGE_TABLE"], Key={"pk": {"S": f"gov#{integration_id}#rate"}}
    )
    return float(item.get("Item", {}).get("slow_until", {}).get("N", 0))


@pytest.fixture(autouse=True)
def _one_case_at_a_time(mail_pipeline):
    """Each case starts with no fault left over and ends with every message accounted for."""
    mail_pipeline.smtp.clear_faults()
    yield
    assert_accounted(mail_pipeline)
