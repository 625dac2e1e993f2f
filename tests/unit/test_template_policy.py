"""The template's contracts, read from template.yaml itself (no network, no AWS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mailbroker.settings import FUNCTION_SETTINGS

from mailbroker_sandbox.aws import load_template, references

TEMPLATE = load_template(Path(__file__).resolve().parents[2] / "template.yaml")
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
GLOBALS: dict[str, Any] = TEMPLATE["Globals"]["Function"]
FUNCTIONS = {lid: spec for lid, spec in RESOURCES.items() if spec["Type"] == "AWS::Serverless::Function"}
# Actions whose service offers no resource-level permissions: "*" is the only valid resource.
# Metrics need no entry: Powertools writes them to the log as EMF.
UNSCOPABLE_ACTIONS = {
    "secretsmanager:ListSecrets",
    "dynamodb:ListStreams",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    # No resource-level permissions; scoped by its condition keys (see the keyless test below).
    "sts:GetWebIdentityToken",
}
# What a DynamoDB stream event source mapping needs of its function's role.
STREAM_READS = {"DescribeStream", "GetRecords", "GetShardIterator", "ListStreams"}
DESIGN_ROUTES = {
    ("POST", "/v1/integrations/{id}/token"),
    ("GET", "/v1/integrations/{id}/health"),
    ("POST", "/v1/integrations/{id}/check"),
    ("POST", "/v1/integrations/{id}/test"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages/{id}"),
}


TRACKING_ROUTES = {("GET", "/v1/t/o/{token}"), ("GET", "/v1/t/c/{token}")}


def unconditional(statements: list[Any]) -> list[dict[str, Any]]:
    """Policy statements, with those under ``Fn::If`` taken from whichever branch holds one."""
    found: list[dict[str, Any]] = []
    for statement in statements:
        if "Fn::If" in statement:
            found.extend(branch for branch in statement["Fn::If"][1:] if "Effect" in branch)
        else:
            found.append(statement)
    return found


def of_type(resource_type: str) -> dict[str, Any]:
    return {lid: spec for lid, spec in RESOURCES.items() if spec["Type"] == resource_type}


def props(logical_id: str) -> dict[str, Any]:
    return RESOURCES[logical_id].get("Properties") or {}


def setting(function_id: str, name: str) -> Any:
    return props(function_id).get(name, GLOBALS.get(name))


def env_names(function_id: str) -> set[str]:
    own = (props(function_id).get("Environment") or {}).get("Variables") or {}
    return set(GLOBALS["Environment"]["Variables"]) | set(own)


def ref_target(value: Any) -> str:
    """The logical id behind ``!Ref X`` or ``!GetAtt X.Attr``."""
    (target,) = references(value)
    return target


def sqs_event_source(function_id: str) -> dict[str, Any]:
    (event,) = [e["Properties"] for e in props(function_id)["Events"].values() if e["Type"] == "SQS"]
    return event


def role_statements(function_id: str) -> list[dict[str, Any]]:
    """Every statement of every policy attached to the function's role."""
    role = ref_target(props(function_id)["Role"])
    statements = []
    for spec in of_type("AWS::IAM::Policy").values():
        if role in {ref_target(r) for r in spec["Properties"]["Roles"]}:
            statements += spec["Properties"]["PolicyDocument"]["Statement"]
    for inline in props(role).get("Policies", []):
        statements += inline["PolicyDocument"]["Statement"]
    return statements


def all_iam_statements() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for lid, spec in RESOURCES.items():
        properties = spec.get("Properties") or {}
        if spec["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            found += [(lid, s) for s in properties["PolicyDocument"]["Statement"]]
        if spec["Type"] == "AWS::IAM::Role":
            for inline in properties.get("Policies", []):
                found += [(lid, s) for s in inline["PolicyDocument"]["Statement"]]
        if spec["Type"] == "AWS::Serverless::Function":
            for policy in properties.get("Policies", []):
                if isinstance(policy, dict) and "Statement" in policy:
                    found += [(lid, s) for s in policy["Statement"]]
    return found


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def allowed_actions(function_id: str) -> set[str]:
    return {
        action
        for statement in role_statements(function_id)
        if statement["Effect"] == "Allow"
        for action in as_list(statement["Action"])
    }


# ------------------------------------------------------------------------------ runtime


def test_every_function_runs_python313_on_arm64_with_active_tracing():
    assert GLOBALS["Runtime"] == "python3.13"
    assert GLOBALS["Architectures"] == ["arm64"]
    assert GLOBALS["Tracing"] == "Active"
    for function_id in FUNCTIONS:
        assert setting(function_id, "Runtime") == "python3.13", function_id
        assert setting(function_id, "Architectures") == ["arm64"], function_id
        assert setting(function_id, "Tracing") == "Active", function_id


def test_handlers_live_where_the_design_puts_them():
    code = {setting(f, "CodeUri"): setting(f, "Handler") for f in FUNCTIONS}
    assert code == {
        "functions/token_broker": "app.lambda_handler",
        "functions/sender": "app.lambda_handler",
        "functions/keeper": "app.lambda_handler",
        "functions/event_publisher": "app.lambda_handler",
        "functions/tracking": "app.lambda_handler",
    }


def test_layer_builds_the_domain_package_for_python313_arm64():
    (layer,) = of_type("AWS::Serverless::LayerVersion").values()
    assert layer["Properties"]["ContentUri"] == "layers/mailbroker"
    assert layer["Metadata"]["BuildMethod"] == "makefile"
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    assert (Path(__file__).resolve().parents[2] / "layers/mailbroker/requirements.txt").is_file()


# -------------------------------------------------------------------------- environment

COMMON_ENV = {
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
    "SECRET_PREFIX",
    "TOKEN_TABLE",
    "MESSAGE_TABLE",
    "TOKEN_KEY_ID",
}


@pytest.mark.parametrize(
    ("function_id", "needed"),
    [
        ("TokenBrokerFunction", COMMON_ENV | {"SEND_QUEUE_URL"}),
        (
            "SenderFunction",
            COMMON_ENV
            | {"SEND_QUEUE_URL", "DEAD_LETTER_QUEUE_URL", "MAX_MESSAGE_AGE_HOURS", "IDEMPOTENCY_HOURS"},
        ),
        ("KeeperFunction", COMMON_ENV | {"ALERT_TOPIC_ARN", "KEEP_ALIVE_DAYS"}),
    ],
)
def test_function_gets_every_variable_its_code_reads(function_id, needed):
    assert needed <= env_names(function_id)


def test_every_variable_the_template_sets_is_read_by_the_settings_model_or_powertools():
    read_by_settings = {field.alias for model in FUNCTION_SETTINGS for field in model.model_fields.values()}
    for function_id in FUNCTIONS:
        unread = {
            name for name in env_names(function_id) - read_by_settings if not name.startswith("POWERTOOLS_")
        }
        assert unread == set(), f"{function_id} sets variables no code reads: {sorted(unread)}"


def test_powertools_never_captures_responses_in_traces():
    assert GLOBALS["Environment"]["Variables"]["POWERTOOLS_TRACER_CAPTURE_RESPONSE"] == "false"


# ------------------------------------------------------------------------ queue and sender


def test_send_queue_visibility_timeout_is_at_least_six_times_the_sender_timeout():
    queue = ref_target(sqs_event_source("SenderFunction")["Queue"])
    assert props(queue)["VisibilityTimeout"] >= 6 * setting("SenderFunction", "Timeout")


def test_sender_reports_batch_item_failures_with_bounded_concurrency():
    event = sqs_event_source("SenderFunction")
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["BatchSize"] == 10
    assert event["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "SenderMaxConcurrency"}
    assert TEMPLATE["Parameters"]["SenderMaxConcurrency"]["MinValue"] >= 2  # the SQS minimum


def test_send_queue_redrives_to_the_dead_letter_queue_which_keeps_messages_longer():
    queue = props(ref_target(sqs_event_source("SenderFunction")["Queue"]))
    dead_letter = ref_target(queue["RedrivePolicy"]["deadLetterTargetArn"])
    assert queue["RedrivePolicy"]["maxReceiveCount"] >= 3
    assert props(dead_letter)["MessageRetentionPeriod"] == 14 * 24 * 3600
    assert queue["MessageRetentionPeriod"] < props(dead_letter)["MessageRetentionPeriod"]


def test_every_queue_is_encrypted_and_denies_insecure_transport():
    queues = set(of_type("AWS::SQS::Queue"))
    denied: set[str] = set()
    for policy in of_type("AWS::SQS::QueuePolicy").values():
        for statement in unconditional(policy["Properties"]["PolicyDocument"]["Statement"]):
            if (
                statement["Effect"] == "Deny"
                and statement["Condition"]["Bool"]["aws:SecureTransport"] == "false"
            ):
                denied |= {ref_target(r) for r in as_list(statement["Resource"])}
    assert denied == queues
    for queue in queues:
        assert props(queue).get("SqsManagedSseEnabled") or props(queue).get("KmsMasterKeyId"), queue


# ------------------------------------------------------------------------------ HTTP API


def test_http_api_authorises_every_route_with_iam_by_default():
    (api,) = of_type("AWS::Serverless::HttpApi").values()
    assert api["Properties"]["Auth"] == {"EnableIamAuthorizer": True, "DefaultAuthorizer": "AWS_IAM"}


def test_every_design_route_is_on_the_iam_api_and_only_the_tracking_routes_opt_out():
    (api_id,) = of_type("AWS::Serverless::HttpApi")
    routes = set()
    for function_id in FUNCTIONS:
        for event in (props(function_id).get("Events") or {}).values():
            if event["Type"] in ("HttpApi", "Api"):
                assert event["Type"] == "HttpApi"
                assert event["Properties"]["ApiId"] == {"Ref": api_id}
                route = (event["Properties"]["Method"], event["Properties"]["Path"])
                if route in TRACKING_ROUTES:
                    assert function_id == "TrackingFunction"
                    assert event["Properties"]["Auth"] == {"Authorizer": "NONE"}
                else:
                    assert "Auth" not in event["Properties"], "a route overrides the IAM authoriser"
                routes.add(route)
    assert routes == DESIGN_ROUTES | TRACKING_ROUTES


def test_the_unauthenticated_routes_are_throttled_and_in_no_client_policy():
    (api,) = of_type("AWS::Serverless::HttpApi").values()
    settings = api["Properties"]["RouteSettings"]
    for method, path in TRACKING_ROUTES:
        limits = settings[f"{method} {path}"]
        assert (
            limits["ThrottlingRateLimit"] < api["Properties"]["DefaultRouteSettings"]["ThrottlingRateLimit"]
        )
    for policy in ("TokenClientPolicy", "MessageClientPolicy"):
        text = str(props(policy)["PolicyDocument"])
        assert "/v1/t/" not in text and "GET/*" not in text


def test_the_tracking_function_verifies_and_the_sender_signs_with_the_hmac_key_only():
    key = props("TrackingKey")
    assert (key["KeySpec"], key["KeyUsage"]) == ("HMAC_256", "GENERATE_VERIFY_MAC")
    assert {"kms:VerifyMac", "dynamodb:GetItem", "dynamodb:UpdateItem"} <= allowed_actions("TrackingFunction")
    assert not {"kms:GenerateMac", "kms:Decrypt", "dynamodb:PutItem", "secretsmanager:GetSecretValue"} & (
        allowed_actions("TrackingFunction")
    )
    assert "kms:GenerateMac" in allowed_actions("SenderFunction")
    for function_id in ("TokenBrokerFunction", "KeeperFunction", "EventPublisherFunction"):
        assert not {"kms:GenerateMac", "kms:VerifyMac"} & allowed_actions(function_id)


def test_http_api_writes_access_logs_with_retention():
    (api,) = of_type("AWS::Serverless::HttpApi").values()
    group = ref_target(api["Properties"]["AccessLogSettings"]["DestinationArn"])
    assert props(group)["RetentionInDays"] == {"Ref": "LogRetentionDays"}


# ------------------------------------------------------------------------------ IAM


def test_every_allowed_statement_is_scoped_to_resources_except_unscopable_actions():
    for owner, statement in all_iam_statements():
        if statement["Effect"] != "Allow":
            continue
        actions = set(as_list(statement["Action"]))
        assert not any("*" in action for action in actions), f"{owner}: wildcard action {actions}"
        if any(resource == "*" for resource in as_list(statement["Resource"])):
            assert actions <= UNSCOPABLE_ACTIONS, f"{owner}: {sorted(actions)} on '*'"


def test_functions_use_their_own_roles_not_generated_ones():
    roles = [ref_target(props(function_id)["Role"]) for function_id in FUNCTIONS]
    assert len(set(roles)) == len(FUNCTIONS)
    for function_id in FUNCTIONS:
        assert "Policies" not in props(function_id)
        policies = set(as_list(RESOURCES[function_id].get("DependsOn", [])))
        assert any(RESOURCES[p]["Type"] == "AWS::IAM::Policy" for p in policies), function_id


def test_secrets_are_readable_and_refresh_tokens_written_back_only_under_the_secret_prefix():
    for function_id in FUNCTIONS:
        for statement in role_statements(function_id):
            actions = set(as_list(statement["Action"]))
            if actions & {"secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue"}:
                (resource,) = as_list(statement["Resource"])
                assert resource["Fn::Sub"].endswith(":secret:${SecretPrefix}*")


def test_only_the_keeper_may_list_secrets_and_publish_alerts():
    assert {"secretsmanager:ListSecrets", "sns:Publish"} <= allowed_actions("KeeperFunction")
    for function_id in ("TokenBrokerFunction", "SenderFunction"):
        assert not {"secretsmanager:ListSecrets", "sns:Publish"} & allowed_actions(function_id)


def test_only_the_sender_consumes_the_send_queue_and_writes_the_dead_letter_queue():
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"}
    assert consume <= allowed_actions("SenderFunction")
    assert not consume & (allowed_actions("TokenBrokerFunction") | allowed_actions("KeeperFunction"))
    for statement in role_statements("SenderFunction"):
        if "sqs:SendMessage" in as_list(statement["Action"]):
            assert ref_target(statement["Resource"]) == "DeadLetterQueue"


def test_no_function_may_change_secrets_or_tables_beyond_items():
    for function_id in FUNCTIONS:
        for action in allowed_actions(function_id):
            service, verb = action.split(":")
            if service == "secretsmanager":
                assert verb in {"GetSecretValue", "PutSecretValue", "ListSecrets"}, action
            if service == "dynamodb":
                assert verb.endswith("Item") or verb in STREAM_READS, action


def test_each_function_writes_only_to_its_own_log_group_with_retention():
    for function_id in FUNCTIONS:
        group = ref_target(props(function_id)["LoggingConfig"]["LogGroup"])
        assert RESOURCES[group]["Type"] == "AWS::Logs::LogGroup"
        assert props(group)["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        log_statements = [
            s
            for s in role_statements(function_id)
            if any(a.startswith("logs:") for a in as_list(s["Action"]))
        ]
        assert [ref_target(s["Resource"]) for s in log_statements] == [group]


def test_the_key_is_rotated_and_named_in_its_policy_for_each_function_role():
    key = RESOURCES["TokenKey"]
    assert key["Properties"]["EnableKeyRotation"] is True
    statements = key["Properties"]["KeyPolicy"]["Statement"]
    (functions_use,) = [s for s in statements if s.get("Sid") == "FunctionsUse"]
    named = {ref_target(arn) for arn in functions_use["Principal"]["AWS"]}
    # The event publisher only decrypts (the tables' streams): its own statement, without GenerateDataKey.
    (reads_streams,) = [s for s in statements if s.get("Sid") == "PublisherReadsStreams"]
    assert reads_streams["Action"] == "kms:Decrypt"
    named.add(ref_target(reads_streams["Principal"]["AWS"]))
    # The tracking function never handles a sealed token: the token key does not name it.
    handlers = set(FUNCTIONS) - {"TrackingFunction"}
    assert named == {ref_target(props(function_id)["Role"]) for function_id in handlers}


# ------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("table_id", sorted(of_type("AWS::DynamoDB::Table")))
def test_table_is_keyed_by_pk_expires_by_ttl_and_is_encrypted_with_the_stack_key(table_id):
    table = props(table_id)
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["SSESpecification"]["SSEEnabled"] is True
    assert RESOURCES[ref_target(table["SSESpecification"]["KMSMasterKeyId"])]["Type"] == "AWS::KMS::Key"


def test_the_stack_has_a_token_table_and_a_message_table():
    assert {"TokenTable", "MessageTable"} <= set(of_type("AWS::DynamoDB::Table"))


# ------------------------------------------------------------------------------ alarms


def alarms_on(metric: str) -> list[dict[str, Any]]:
    return [
        a["Properties"]
        for a in of_type("AWS::CloudWatch::Alarm").values()
        if a["Properties"]["MetricName"] == metric
    ]


@pytest.mark.parametrize("queue", ["DeadLetterQueue", "EventFailureQueue"])
def test_a_message_in_a_failure_queue_raises_an_alarm_to_the_alert_topic(queue):
    (alarm,) = [
        a
        for a in alarms_on("ApproximateNumberOfMessagesVisible")
        if a["Dimensions"][0]["Value"] == {"Fn::GetAtt": [queue, "QueueName"]}
    ]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)
    assert alarm["AlarmActions"] == [{"Ref": "AlertTopic"}]


@pytest.mark.parametrize("metric", ["Errors", "Throttles"])
def test_every_function_has_an_alarm_on(metric):
    watched = {ref_target(a["Dimensions"][0]["Value"]) for a in alarms_on(metric)}
    assert watched == set(FUNCTIONS)
    assert all(a["AlarmActions"] == [{"Ref": "AlertTopic"}] for a in alarms_on(metric))


def test_alert_topic_is_encrypted_with_the_stack_key():
    topic = props("AlertTopic")
    assert RESOURCES[ref_target(topic["KmsMasterKeyId"])]["Type"] == "AWS::KMS::Key"


# ------------------------------------------------------------------------------ outputs


def test_outputs_give_operators_and_tests_what_they_need():
    assert {
        "HttpApiUrl",
        "SendQueueUrl",
        "DeadLetterQueueUrl",
        "TokenTableName",
        "MessageTableName",
        "AlertTopicArn",
        "TokenKeyArn",
        "TokenBrokerFunctionArn",
        "SenderFunctionArn",
        "KeeperFunctionArn",
        "SecretPrefix",
    } <= set(TEMPLATE["Outputs"])


# ------------------------------------------------------------------------------ delivery events


def test_the_event_publisher_reads_the_two_streams_and_puts_events_on_one_bus_only():
    statements = role_statements("EventPublisherFunction")
    actions = allowed_actions("EventPublisherFunction")
    assert not any(action.endswith("Item") for action in actions), "the publisher never touches an item"
    (put,) = [s for s in statements if "events:PutEvents" in as_list(s["Action"])]
    assert put["Resource"]["Fn::Sub"].endswith(":event-bus/${EventBusName}")
    (reads,) = [s for s in statements if "dynamodb:GetRecords" in as_list(s["Action"])]
    assert {tuple(r["Fn::GetAtt"]) for r in reads["Resource"]} == {
        ("MessageTable", "StreamArn"),
        ("TokenTable", "StreamArn"),
    }
    for function_id in ("TokenBrokerFunction", "SenderFunction", "KeeperFunction"):
        assert not {"events:PutEvents", "dynamodb:GetRecords"} & allowed_actions(function_id)


def test_the_publishers_stream_mappings_retry_bisect_and_record_what_they_give_up_on():
    events = props("EventPublisherFunction")["Events"]
    assert {e["Properties"]["Stream"]["Fn::GetAtt"][0] for e in events.values()} == {
        "MessageTable",
        "TokenTable",
    }
    for event in events.values():
        mapping = event["Properties"]
        assert event["Type"] == "DynamoDB"
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert mapping["BisectBatchOnFunctionError"] is True
        assert mapping["MaximumRecordAgeInSeconds"] == 86400  # as long as the stream keeps a record
        assert mapping["DestinationConfig"]["OnFailure"]["Destination"] == {
            "Fn::GetAtt": ["EventFailureQueue", "Arn"]
        }
    for table in ("MessageTable", "TokenTable"):
        assert props(table)["StreamSpecification"] == {"StreamViewType": "NEW_AND_OLD_IMAGES"}


def test_the_delivery_events_rule_exists_only_when_an_operator_names_a_target():
    rule = RESOURCES["DeliveryEventsRule"]
    assert rule["Condition"] == "HasEventsTarget"
    assert TEMPLATE["Parameters"]["EventsTargetArn"]["Default"] == ""
    assert TEMPLATE["Parameters"]["EventBusName"]["Default"] == "default"
    assert rule["Properties"]["EventPattern"] == {"source": ["mailbroker"]}
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Ref": "EventsTargetArn"}
    assert RESOURCES["DeliveryEventsTargetRole"]["Condition"] == "EventsTargetIsApiDestination"


def test_web_identity_tokens_are_only_for_the_keyless_audiences_of_the_refreshing_functions():
    policy = RESOURCES["KeylessWebIdentityPolicy"]
    assert policy["Condition"] == "KeylessEnabled"
    roles = {ref_target(role) for role in policy["Properties"]["Roles"]}
    assert roles == {"TokenBrokerRole", "SenderRole", "KeeperRole"}
    [statement] = policy["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Action"] == "sts:GetWebIdentityToken"
    condition = statement["Condition"]
    audiences = condition["ForAllValues:StringEquals"]["sts:IdentityTokenAudience"]
    assert audiences == {"Fn::Split": [",", {"Ref": "KeylessAudiences"}]}
    assert int(condition["NumericLessThanEquals"]["sts:DurationSeconds"]) <= 300
    others = [
        logical_id
        for logical_id, resource in RESOURCES.items()
        if resource["Type"] == "AWS::IAM::Policy"
        and logical_id != "KeylessWebIdentityPolicy"
        and "GetWebIdentityToken" in str(resource["Properties"]["PolicyDocument"])
    ]
    assert others == []


def test_only_the_sender_batch_writes_and_only_status_records():
    batch = [
        s for s in role_statements("SenderFunction") if "dynamodb:BatchWriteItem" in as_list(s["Action"])
    ]
    assert [s["Resource"] for s in batch] == [{"Fn::GetAtt": ["MessageTable", "Arn"]}]
    for function_id in ("TokenBrokerFunction", "KeeperFunction", "TrackingFunction"):
        assert "dynamodb:BatchWriteItem" not in allowed_actions(function_id)
