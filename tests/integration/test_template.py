"""The sandbox builds the template's AWS on a moto server, and what it builds behaves as declared."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from mailbroker.settings import SenderSettings

from mailbroker_sandbox.aws import MotoServer, provision


def table_ids(template):
    return sorted(
        lid for lid, spec in template["Resources"].items() if spec["Type"] == "AWS::DynamoDB::Table"
    )


def test_moto_server_answers_on_loopback_until_stopped():
    with MotoServer() as server:
        url = f"{server.endpoint_url}/moto-api/"
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback http URL
            assert answer.status == 200

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback http URL


def test_every_table_has_the_templates_key_schema_and_ttl(stack, template):
    dynamodb = stack.client("dynamodb")
    for table_id in table_ids(template):
        declared = template["Resources"][table_id]["Properties"]
        name = stack.table_names[table_id]

        table = dynamodb.describe_table(TableName=name)["Table"]
        ttl = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]

        assert table["KeySchema"] == declared["KeySchema"]
        assert table["AttributeDefinitions"] == declared["AttributeDefinitions"]
        assert table["BillingModeSummary"]["BillingMode"] == declared["BillingMode"]
        assert ttl == {
            "TimeToLiveStatus": "ENABLED",
            "AttributeName": declared["TimeToLiveSpecification"]["AttributeName"],
        }


def test_send_queue_has_the_templates_timeouts_and_redrives_to_the_dead_letter_queue(stack, template):
    declared = template["Resources"]["SendQueue"]["Properties"]
    sqs = stack.client("sqs")

    attributes = sqs.get_queue_attributes(QueueUrl=stack.queue_urls["SendQueue"], AttributeNames=["All"])[
        "Attributes"
    ]

    assert int(attributes["VisibilityTimeout"]) == declared["VisibilityTimeout"]
    assert int(attributes["MessageRetentionPeriod"]) == declared["MessageRetentionPeriod"]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": stack.attribute("DeadLetterQueue", "Arn"),
        "maxReceiveCount": declared["RedrivePolicy"]["maxReceiveCount"],
    }


def test_message_received_more_than_max_receive_count_times_lands_in_the_dead_letter_queue(stack, template):
    # Given a message on the send queue
    max_receives = template["Resources"]["SendQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"]
    sqs = stack.client("sqs")
    send_queue, dead_letters = stack.queue_urls["SendQueue"], stack.queue_urls["DeadLetterQueue"]
    sqs.send_message(QueueUrl=send_queue, MessageBody='{"id": "poison"}')

    # When it is received and never deleted, maxReceiveCount times
    for _ in range(max_receives):
        received = sqs.receive_message(QueueUrl=send_queue, VisibilityTimeout=0)
        assert len(received["Messages"]) == 1

    # Then the next receive finds the send queue empty and the message in the dead-letter queue
    assert "Messages" not in sqs.receive_message(QueueUrl=send_queue, VisibilityTimeout=0)
    moved = sqs.receive_message(QueueUrl=dead_letters)["Messages"]
    assert [m["Body"] for m in moved] == ['{"id": "poison"}']


@pytest.mark.parametrize("function_id", ["TokenBrokerFunction", "SenderFunction", "KeeperFunction"])
def test_function_env_names_resources_that_exist(stack, function_id):
    env = stack.function_env(function_id)
    dynamodb, sqs = stack.client("dynamodb"), stack.client("sqs")

    for name in ("TOKEN_TABLE", "MESSAGE_TABLE"):
        assert dynamodb.describe_table(TableName=env[name])["Table"]["TableStatus"] == "ACTIVE"
    for name in ("SEND_QUEUE_URL", "DEAD_LETTER_QUEUE_URL"):
        if name in env:
            assert sqs.get_queue_attributes(QueueUrl=env[name], AttributeNames=["QueueArn"])["Attributes"]
    if "ALERT_TOPIC_ARN" in env:
        assert stack.client("sns").get_topic_attributes(TopicArn=env["ALERT_TOPIC_ARN"])["Attributes"]
    key = stack.client("kms").describe_key(KeyId=env["TOKEN_KEY_ID"])["KeyMetadata"]
    assert key["Enabled"] is True
    assert not [value for value in env.values() if "${" in value or "{'" in value]


def test_function_env_parses_into_settings_that_point_at_the_stack(stack):
    settings = SenderSettings.from_env(stack.function_env("SenderFunction"))

    assert settings.token_table == stack.table_names["TokenTable"]
    assert settings.message_table == stack.table_names["MessageTable"]
    assert settings.send_queue_url == stack.queue_urls["SendQueue"]
    assert settings.dead_letter_queue_url == stack.queue_urls["DeadLetterQueue"]
    assert settings.token_key_id == stack.resources["TokenKey"]
    assert settings.secret_prefix == "mailbroker/"


def test_token_key_encrypts_data_keys_with_rotation_on(stack):
    kms = stack.client("kms")

    data_key = kms.generate_data_key(KeyId=stack.resources["TokenKey"], KeySpec="AES_256")
    plaintext = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], KeyId=stack.resources["TokenKey"])[
        "Plaintext"
    ]

    assert plaintext == data_key["Plaintext"]
    assert kms.get_key_rotation_status(KeyId=stack.resources["TokenKey"])["KeyRotationEnabled"] is True


def test_parameters_override_the_templates_defaults(moto_server, template):
    stack = provision(template, endpoint_url=moto_server.endpoint_url, parameters={"SecretPrefix": "other/"})
    try:
        assert stack.function_env("KeeperFunction")["SECRET_PREFIX"] == "other/"
    finally:
        stack.delete()


def test_a_parameter_outside_its_allowed_values_is_refused(moto_server, template):
    with pytest.raises(ValueError, match="LogLevel"):
        provision(template, endpoint_url=moto_server.endpoint_url, parameters={"LogLevel": "CHATTY"})


def test_function_settings_come_from_the_template(stack):
    sender = stack.function_settings("SenderFunction")

    assert (sender["runtime"], sender["architectures"], sender["timeout"]) == ("python3.13", ["arm64"], 90)
    assert sender["queue_url"] == stack.queue_urls["SendQueue"]
    assert sender["function_response_types"] == ["ReportBatchItemFailures"]
    assert (sender["batch_size"], sender["maximum_concurrency"]) == (10, 5)
    assert stack.function_settings("KeeperFunction")["schedule_expression"] == "rate(1 hour)"


def test_two_stacks_on_one_server_do_not_share_resources(stack, moto_server, template):
    other = provision(template, endpoint_url=moto_server.endpoint_url)
    try:
        assert set(other.table_names.values()).isdisjoint(stack.table_names.values())
        assert set(other.queue_urls.values()).isdisjoint(stack.queue_urls.values())
    finally:
        other.delete()


def test_aws_env_points_default_boto3_clients_at_the_stack(stack, function_env):
    import boto3

    env = function_env("SenderFunction")

    tables = boto3.client("dynamodb").list_tables()["TableNames"]
    assert env["TOKEN_TABLE"] in tables
