"""One sender execution environment of the load test, in a process of its own: it polls the send
queue as the SQS event source mapping does, invokes the real sender handler with batches of up
to ten, deletes what the handler reports done, and lets every delay the handler asked for pass at
once (the test is about outcomes, not waiting)."""

from __future__ import annotations

import os
import sys
from typing import Any


def run(env: dict[str, str], queue_arn: str, stop: Any, idle: Any, results: Any) -> None:
    os.environ.update(env)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the environment's log lines, for its life
    from botocore.exceptions import ClientError
    from mailbroker import runtime
    from sender.app import lambda_handler

    from mailbroker_sandbox.local import powertools_from_env
    from tests.fixtures.events import context, sqs_event

    powertools_from_env(env)
    sqs = runtime.aws_client("sqs")
    queue_url = env["SEND_QUEUE_URL"]
    invocations = records = put_back = 0
    while not stop.is_set():
        messages = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            idle.set()
            continue
        idle.clear()
        event = sqs_event(messages, queue_arn)
        answer = lambda_handler(event, context())
        failed = {f["itemIdentifier"] for f in answer["batchItemFailures"]}
        invocations, records, put_back = invocations + 1, records + len(messages), put_back + len(failed)
        for message in messages:
            try:
                if message["MessageId"] in failed:
                    sqs.change_message_visibility(
                        QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                    )
                else:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            except ClientError as error:
                # On a loaded machine the delay the handler set can run out before this call, and
                # another environment receives the message: its old receipt handle is then invalid,
                # as it would be for the event source mapping. The message is on the queue, not lost.
                if error.response.get("Error", {}).get("Code") != "ReceiptHandleIsInvalid":
                    raise
    results.put({"pid": os.getpid(), "invocations": invocations, "records": records, "put_back": put_back})
