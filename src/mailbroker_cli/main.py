"""``mailbroker``: the operator's command line.

    mailbroker integration add|list|show|remove   register and inspect integrations
    mailbroker consent google ID                  obtain a Gmail refresh token (loopback flow)
    mailbroker consent microsoft ID               a user's delegated consent (device code or browser)
    mailbroker cert create ID                     key + self-signed certificate for an Entra app
    mailbroker setup microsoft ID [--federated]   admin consent, Exchange PowerShell (+ keyless trust)
    mailbroker setup google ID --workload-identity  keyless Google: pool, provider, IAM, delegation
    mailbroker doctor ID                          diagnose an integration step by step
    mailbroker send | status ID | dlq list|redrive   messages
    mailbroker test ID --to ADDR [--wait]         a labelled test mail through the whole path
    mailbroker local                              the sandbox, kept up for exploration
    mailbroker errors [--markdown]                every error code with its hint

AWS is reached the standard way (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL); ``--json`` prints
machine-readable output for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from mailbroker_cli.context import CliError, Context
from mailbroker_cli.output import Output


def build_parser() -> argparse.ArgumentParser:
    from mailbroker_cli import certificates, consent, doctor, integrations, messages, setup

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--stack",
        default=argparse.SUPPRESS,
        help="read table, queue and prefix names from this CloudFormation stack's outputs",
    )

    parser = argparse.ArgumentParser(
        prog="mailbroker",
        description="Operate mailbroker: integrations, consent, diagnosis, messages and the local sandbox.",
        parents=[common],
    )
    from mailbroker import __version__

    parser.add_argument("--version", action="version", version=f"mailbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    integrations.register(commands, common)
    consent.register(commands, common)
    certificates.register(commands, common)
    setup.register(commands, common)
    doctor.register(commands, common)
    messages.register(commands, common)

    local = commands.add_parser(
        "local",
        parents=[common],
        help="run the local sandbox until Ctrl-C, HTTP API on a loopback port",
        description="Start moto, the sandbox token endpoints and SMTP server, provision template.yaml, "
        "register the demo integrations, and serve the HTTP API on 127.0.0.1 until interrupted.",
    )
    local.add_argument("--port", type=int, default=0, help="HTTP API port (default: any free)")
    local.add_argument("--template", default="template.yaml")
    local.add_argument("--no-demo", action="store_true", help="start without the demo integrations")
    local.set_defaults(handler=run_local)

    errors = commands.add_parser("errors", parents=[common], help="every error code, its retry rule and hint")
    errors.add_argument("--markdown", action="store_true", help="the troubleshooting table as Markdown")
    errors.set_defaults(handler=list_errors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(as_json=getattr(args, "json", False))
    try:
        ctx = Context(stack=getattr(args, "stack", None))
        with function_logs_on_stderr():
            return int(args.handler(args, ctx, out))
    except CliError as exc:
        out.error(exc.code, exc.message, exc.hint)
        return 2
    except KeyboardInterrupt:
        out.note("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        return report_failure(exc, out)


@contextlib.contextmanager
def function_logs_on_stderr() -> Iterator[None]:
    """The domain code logs JSON for CloudWatch; on a terminal only its warnings matter, and they
    go to stderr so that stdout stays clean for --json (MAILBROKER_LOG_LEVEL=INFO shows more)."""
    from mailbroker.observability import logger

    handler = logger.registered_handler
    stream_handler = handler if isinstance(handler, logging.StreamHandler) else None
    level = logger.log_level
    previous = stream_handler.stream if stream_handler else None
    if stream_handler is not None:
        stream_handler.stream = sys.stderr  # not setStream(): it would flush a stream that may be closed
    logger.setLevel(os.environ.get("MAILBROKER_LOG_LEVEL", "WARNING").upper())
    try:
        yield
    finally:
        logger.setLevel(level)
        if stream_handler is not None:
            stream_handler.stream = previous


def report_failure(exc: Exception, out: Output) -> int:
    from mailbroker_cli.context import describe_failure

    described = describe_failure(exc)
    if described is None:
        raise exc
    out.error(*described)
    return 1


def list_errors(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    from mailbroker.errors import CATALOGUE

    if out.as_json:
        out.json(
            [
                {"code": k.code, "retryable": k.retryable, "http_status": k.http_status, "hint": k.hint}
                for k in CATALOGUE.values()
            ]
        )
    elif args.markdown:
        out.line(troubleshooting_markdown().rstrip("\n"))
    else:
        out.table(
            ["CODE", "RETRIED", "HTTP", "WHAT TO DO"],
            [
                [k.code, "yes" if k.retryable else "no", str(k.http_status), k.hint]
                for k in CATALOGUE.values()
            ],
        )
    return 0


def troubleshooting_markdown() -> str:
    """docs/troubleshooting.md: the error catalogue as a table (a test keeps the file in step)."""
    from mailbroker.errors import CATALOGUE

    lines = [
        "# Troubleshooting",
        "",
        "Every failure mailbroker reports carries one of these codes, in the message status record, the",
        "dead-letter queue's message attributes, `mailbroker doctor` and the HTTP API's error bodies.",
        "Generated from `mailbroker/errors.py`: `mailbroker errors --markdown > docs/troubleshooting.md`.",
        "",
        "| code | retried | HTTP | what to do |",
        "| --- | --- | --- | --- |",
    ]
    for kind in CATALOGUE.values():
        hint = kind.hint.replace("|", "\\|")
        retried = "yes" if kind.retryable else "no"
        lines.append(f"| `{kind.code}` | {retried} | {kind.http_status} | {hint} |")
    return "\n".join(lines) + "\n"


def run_local(args: argparse.Namespace, ctx: Context, out: Output) -> int:
    from mailbroker_sandbox.local import serve

    return serve(template=args.template, port=args.port, demo=not args.no_demo, out=out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
