"""The sandbox's AWS: moto in server mode, with the stack's resources created from ``template.yaml``.

``provision()`` walks the template's resources in dependency order and creates every DynamoDB
table (with its stream), SQS queue, SNS topic, KMS key (and alias) and EventBridge rule on the
moto server, with the key schemas, TTL,
timeouts and redrive policies the template declares. Functions, the HTTP API, roles, log groups
and alarms have no local counterpart: they get placeholder names so that every ``!Ref``,
``!GetAtt`` and ``!Sub`` still resolves, and the functions' environment and settings are read
from the template (``Stack.function_env``, ``Stack.function_settings``). There is no hand-kept
copy of a name, key or timeout: a drift between template and code fails locally.

Clients reach the server through boto3's standard ``AWS_ENDPOINT_URL`` and dummy credentials
(``MotoServer.env()``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import graphlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_REGION = "us-east-1"
# Variables that would make boto3 prefer a real profile over the sandbox's dummy credentials.
PROFILE_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")
FUNCTION_TYPES = ("AWS::Serverless::Function", "AWS::Lambda::Function")
# moto_atomic's flag: exit when stdin (a pipe from the owner) reaches end of file.
EXIT_WITH_PARENT = "--exit-with-parent"


def aws_environment(endpoint_url: str, region: str = DEFAULT_REGION) -> dict[str, str]:
    """The variables that point every boto3 client at ``endpoint_url`` with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
    }


# ---------------------------------------------------------------------------------------- server


class MotoServer:
    """moto server on a free loopback port, in its own process, with DynamoDB's conditional
    writes atomic as in the real service (``mailbroker_sandbox.moto_atomic``).

    The server runs in its own process group, so a Ctrl-C meant for its owner does not kill it
    half-way and ``stop()`` ends the whole group. Its stdin is a pipe from the owner: when the
    owner dies without calling ``stop()`` (SIGKILL, a crash), the pipe closes and the server exits
    with it, so it is never orphaned.

    Use as a context manager, or ``start()`` / ``stop()``. ``endpoint_url`` is set once started.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 20.0) -> None:
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.endpoint_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> MotoServer:
        if self._process is not None:
            return self
        attempts = 1 if self.port else 3  # a probed free port can be taken before moto binds it
        for _ in range(attempts):
            port = self.port or _free_port(self.host)
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the server writes to it until stop()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mailbroker_sandbox.moto_atomic",
                    EXIT_WITH_PARENT,
                    "-H",
                    self.host,
                    "-p",
                    str(port),
                ],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            url = f"http://{self.host}:{port}"
            if _wait_until_answering(process, url, self.start_timeout):
                self._process, self.port, self.endpoint_url = process, port, url
                atexit.register(self.stop)  # even when the owner never reaches stop()
                return self
            _terminate(process)
        raise RuntimeError(f"moto server did not start on {self.host}: {self._read_log()}")

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None
            atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None

    def reset(self) -> None:
        """Forget every resource on the server."""
        url = f"{self.endpoint_url}/moto-api/reset"
        request = urllib.request.Request(url, method="POST")  # noqa: S310 - loopback URL built here
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310
            pass

    def env(self, region: str = DEFAULT_REGION) -> dict[str, str]:
        return aws_environment(self.endpoint_url, region)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _wait_until_answering(process: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 - loopback
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """End the process and its group (it leads one: ``start_new_session``): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    if process.stdin is not None:
        process.stdin.close()


# -------------------------------------------------------------------------------------- template


class _TemplateLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (``!Ref``, ``!GetAtt``, ``!Sub``, ``!If`` ...)."""


def _construct_intrinsic(loader: Any, suffix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_TemplateLoader.add_multi_constructor("!", _construct_intrinsic)


def load_template(path: str | Path = "template.yaml") -> dict[str, Any]:
    """The template as plain data, short-form tags turned into their long form
    (``!Ref X`` → ``{"Ref": "X"}``, ``!GetAtt A.B`` → ``{"Fn::GetAtt": ["A", "B"]}``)."""
    with open(path, encoding="utf-8") as handle:
        template = yaml.load(handle, Loader=_TemplateLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(template, dict) or "Resources" not in template:
        raise ValueError(f"{path} is not a CloudFormation template")
    return template


def references(value: Any) -> set[str]:
    """Every name ``value`` refers to through Ref, GetAtt or Sub: resources, parameters, pseudo ones."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        direct = _intrinsic_references(key, arg)
        if direct is not None:
            return direct
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    found: set[str] = set()
    for item in items:
        found |= references(item)
    return found


def _intrinsic_references(key: str, arg: Any) -> set[str] | None:
    """The names one intrinsic function refers to; None when ``key`` is not Ref, GetAtt or Sub."""
    if key == "Ref" and isinstance(arg, str):
        return {arg}
    if key == "Fn::GetAtt":
        return {arg[0] if isinstance(arg, list) else str(arg).split(".", 1)[0]}
    if key == "Fn::Sub":
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        found = {
            name.split(".", 1)[0]
            for name in _SUB_VARIABLE.findall(text)
            if not name.startswith("!") and name not in variables
        }
        return found | references(variables)
    return None


_SUB_VARIABLE = re.compile(r"\$\{([^}]+)\}")
_NO_VALUE = object()


class _Resolver:
    """Evaluates intrinsic functions against parameters, conditions and created resources."""

    def __init__(self, template: Mapping[str, Any], parameters: dict[str, Any], pseudo: dict[str, Any]):
        self.template = template
        self.values: dict[str, Any] = {**pseudo, **parameters}
        self.attributes: dict[str, Mapping[str, Any]] = {}
        self.conditions: dict[str, bool] = {}
        for name, expression in (template.get("Conditions") or {}).items():
            self.conditions[name] = bool(self.resolve(expression))

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [v for v in (self.resolve(item) for item in value) if v is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            function = self._functions.get(key)
            if function is not None:
                return function(self, arg)
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _NO_VALUE}

    def ref(self, name: str) -> Any:
        if name not in self.values:
            raise KeyError(f"template refers to {name!r}, which is neither a parameter nor a resource")
        return self.values[name]

    def get_att(self, logical_id: str, attribute: str) -> Any:
        try:
            return self.attributes[logical_id][attribute]
        except KeyError:
            raise KeyError(
                f"template reads {logical_id}.{attribute}, which the sandbox does not know"
            ) from None

    def _ref(self, arg: str) -> Any:
        return self.ref(arg)

    def _get_att(self, arg: Any) -> Any:
        logical_id, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
        return self.get_att(logical_id, self.resolve(attribute))

    def _sub(self, arg: Any) -> str:
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name:
                return str(self.get_att(*name.split(".", 1)))
            return str(self.ref(name))

        return _SUB_VARIABLE.sub(substitute, text)

    def _join(self, arg: Any) -> str:
        delimiter, items = arg
        return str(delimiter).join(str(item) for item in self.resolve(items))

    def _if(self, arg: Any) -> Any:
        condition, when_true, when_false = arg
        return self.resolve(when_true if self.conditions[condition] else when_false)

    def _select(self, arg: Any) -> Any:
        index, items = arg
        return self.resolve(items)[int(self.resolve(index))]

    def _split(self, arg: Any) -> list[str]:
        delimiter, text = arg
        return str(self.resolve(text)).split(delimiter)

    def _find_in_map(self, arg: Any) -> Any:
        name, first, second = (self.resolve(a) for a in arg)
        return self.template["Mappings"][name][first][second]

    def _get_azs(self, arg: Any) -> list[str]:
        region = self.resolve(arg) or self.values["AWS::Region"]
        return [f"{region}{zone}" for zone in "abc"]

    def _base64(self, arg: Any) -> str:
        import base64

        return base64.b64encode(str(self.resolve(arg)).encode()).decode()

    _functions: dict[str, Any] = {
        "Ref": _ref,
        "Fn::GetAtt": _get_att,
        "Fn::Sub": _sub,
        "Fn::Join": _join,
        "Fn::If": _if,
        "Fn::Select": _select,
        "Fn::Split": _split,
        "Fn::FindInMap": _find_in_map,
        "Fn::GetAZs": _get_azs,
        "Fn::Base64": _base64,
        "Fn::Equals": lambda self, arg: self.resolve(arg[0]) == self.resolve(arg[1]),
        "Fn::Not": lambda self, arg: not self.resolve(arg[0]),
        "Fn::And": lambda self, arg: all(self.resolve(item) for item in arg),
        "Fn::Or": lambda self, arg: any(self.resolve(item) for item in arg),
        "Condition": lambda self, arg: self.conditions[arg],
    }


def _parameter_values(template: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    declared = template.get("Parameters") or {}
    unknown = set(overrides) - set(declared)
    if unknown:
        raise ValueError(f"template declares no parameter {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in overrides:
            raw = overrides[name]
        elif "Default" in spec:
            raw = spec["Default"]
        else:
            raise ValueError(f"parameter {name} has no default and no value was given")
        text = _text(raw)
        allowed = spec.get("AllowedValues")
        if allowed is not None and text not in {_text(a) for a in allowed}:
            raise ValueError(f"parameter {name}={text!r} is not one of {allowed}")
        kind = spec.get("Type", "String")
        values[name] = [p.strip() for p in text.split(",")] if kind == "CommaDelimitedList" else text
    return values


def _text(value: Any) -> str:
    """A value as CloudFormation hands it to an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------- provision


@dataclass
class Stack:
    """What ``provision()`` created, and the template's view of the functions."""

    name: str
    region: str
    endpoint_url: str
    account_id: str
    template: dict[str, Any]
    parameters: dict[str, Any]
    # logical id -> what !Ref gives: table name, queue URL, topic ARN, key id, alias name; for
    # resources without a local counterpart, a placeholder name or ARN.
    resources: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    _resolver: _Resolver | None = field(default=None, repr=False)

    # -- what was created
    def _of_type(self, resource_type: str) -> dict[str, Any]:
        return {lid: self.resources[lid] for lid in self.created if self.types[lid] == resource_type}

    @property
    def table_names(self) -> dict[str, str]:
        return self._of_type("AWS::DynamoDB::Table")

    @property
    def queue_urls(self) -> dict[str, str]:
        return self._of_type("AWS::SQS::Queue")

    @property
    def topic_arns(self) -> dict[str, str]:
        return self._of_type("AWS::SNS::Topic")

    @property
    def key_ids(self) -> dict[str, str]:
        return self._of_type("AWS::KMS::Key")

    @property
    def topic_arn(self) -> str:
        return _only(self.topic_arns, "SNS topic")

    @property
    def key_id(self) -> str:
        return _only(self.key_ids, "KMS key")

    def attribute(self, logical_id: str, name: str) -> Any:
        """What ``!GetAtt logical_id.name`` gives (e.g. a queue's or table's ``Arn``)."""
        return self.resolver.get_att(logical_id, name)

    @property
    def outputs(self) -> dict[str, str]:
        return {
            name: _text(self.resolver.resolve(spec["Value"]))
            for name, spec in (self.template.get("Outputs") or {}).items()
            if self._condition_holds(spec)
        }

    # -- functions, as the template configures them
    @property
    def functions(self) -> list[str]:
        return [lid for lid, kind in self.types.items() if kind in FUNCTION_TYPES]

    def function_env(self, logical_id: str) -> dict[str, str]:
        """The function's environment variables (Globals merged with its own), resolved against
        the created resources and the parameters."""
        variables = (self._function_properties(logical_id).get("Environment") or {}).get("Variables") or {}
        return {name: _text(value) for name, value in self.resolver.resolve(variables).items()}

    def function_settings(self, logical_id: str) -> dict[str, Any]:
        """Timeout, memory, runtime and event-source settings of one function, from the template.

        Keys: runtime, architectures, handler, code_uri, timeout, memory_size, tracing, events
        (name -> {"type", **resolved properties}); for an SQS event also queue_url, queue_arn,
        batch_size, maximum_batching_window, function_response_types, maximum_concurrency; for a
        schedule, schedule_expression; for HTTP API events, routes [(method, path)]; for DynamoDB
        stream events, streams [{"name", "stream_arn", "starting_position", "batch_size",
        "function_response_types", "filters" (parsed patterns), "on_failure" (a queue ARN or None),
        "maximum_retry_attempts"}].
        """
        properties = self.resolver.resolve(self._function_properties(logical_id))
        settings: dict[str, Any] = {
            "runtime": properties.get("Runtime"),
            "architectures": properties.get("Architectures", ["x86_64"]),
            "handler": properties.get("Handler"),
            "code_uri": properties.get("CodeUri"),
            "timeout": int(properties.get("Timeout", 3)),
            "memory_size": int(properties.get("MemorySize", 128)),
            "tracing": properties.get("Tracing"),
            "environment": self.function_env(logical_id),
            "events": {},
            "routes": [],
            "streams": [],
        }
        arn_to_url = {self.attribute(lid, "Arn"): url for lid, url in self.queue_urls.items()}
        for name, event in (properties.get("Events") or {}).items():
            kind, props = event.get("Type"), event.get("Properties") or {}
            settings["events"][name] = {"type": kind, **props}
            if kind == "SQS":
                settings.update(
                    queue_arn=props["Queue"],
                    queue_url=arn_to_url.get(props["Queue"]),
                    batch_size=int(props.get("BatchSize", 10)),
                    maximum_batching_window=int(props.get("MaximumBatchingWindowInSeconds", 0)),
                    function_response_types=list(props.get("FunctionResponseTypes", [])),
                    maximum_concurrency=_int_or_none(
                        (props.get("ScalingConfig") or {}).get("MaximumConcurrency")
                    ),
                )
            elif kind in ("Schedule", "ScheduleV2"):
                settings["schedule_expression"] = props.get("ScheduleExpression") or props.get("Schedule")
            elif kind in ("HttpApi", "Api"):
                settings["routes"].append((str(props.get("Method", "ANY")).upper(), props.get("Path")))
            elif kind == "DynamoDB":
                settings["streams"].append(_stream_source(name, props))
        return settings

    @property
    def http_routes(self) -> list[dict[str, str]]:
        """Every HTTP route of every function: {"method", "path", "function"}."""
        return [
            {"method": method, "path": path, "function": lid}
            for lid in self.functions
            for method, path in self.function_settings(lid)["routes"]
        ]

    # -- clients and teardown
    def client(self, service: str) -> Any:
        """A boto3 client for this stack's server and region."""
        return _client(self.endpoint_url, self.region, service)

    def delete(self) -> None:
        """Delete what was created (best effort: a resource already gone is not an error)."""
        from botocore.exceptions import ClientError

        for logical_id in reversed(self.created):
            deleter = _DELETERS.get(self.types[logical_id])
            if deleter is not None:
                with contextlib.suppress(ClientError):
                    deleter(self, self.resources[logical_id])
        self.created.clear()

    # -- internals
    @property
    def resolver(self) -> _Resolver:
        assert self._resolver is not None, "Stack is built by provision()"
        return self._resolver

    def _function_properties(self, logical_id: str) -> dict[str, Any]:
        resource = self.template["Resources"].get(logical_id)
        if resource is None or resource.get("Type") not in FUNCTION_TYPES:
            raise KeyError(f"template has no function {logical_id!r}")
        own = resource.get("Properties") or {}
        if resource["Type"] != "AWS::Serverless::Function":
            return dict(own)
        shared = ((self.template.get("Globals") or {}).get("Function")) or {}
        return _merge_globals(shared, own)

    def _condition_holds(self, spec: Mapping[str, Any]) -> bool:
        condition = spec.get("Condition")
        return condition is None or self.resolver.conditions[condition]


@functools.lru_cache(maxsize=64)
def _client(endpoint_url: str, region: str, service: str) -> Any:
    """One client per server, region and service: building one costs tens of milliseconds, and
    boto3 clients are safe to share between threads."""
    import boto3

    env = aws_environment(endpoint_url, region)
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=env["AWS_SESSION_TOKEN"],
    )


def _stream_source(name: str, props: Mapping[str, Any]) -> dict[str, Any]:
    patterns = ((props.get("FilterCriteria") or {}).get("Filters")) or []
    on_failure = ((props.get("DestinationConfig") or {}).get("OnFailure")) or {}
    return {
        "name": name,
        "stream_arn": props["Stream"],
        "starting_position": props.get("StartingPosition", "LATEST"),
        "batch_size": int(props.get("BatchSize", 100)),
        "function_response_types": list(props.get("FunctionResponseTypes", [])),
        "filters": [json.loads(f["Pattern"]) for f in patterns],
        "on_failure": on_failure.get("Destination"),
        "maximum_retry_attempts": int(props.get("MaximumRetryAttempts", -1)),
    }


def _only(found: Mapping[str, str], what: str) -> str:
    if len(found) != 1:
        raise LookupError(f"template has {len(found)} {what}s; pick one from the mapping by logical id")
    return next(iter(found.values()))


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _merge_globals(shared: Any, own: Any) -> Any:
    """SAM's Globals semantics: maps merge, lists add up, scalars are overridden."""
    if isinstance(shared, dict) and isinstance(own, dict) and not _is_intrinsic(own):
        merged = dict(shared)
        for key, value in own.items():
            merged[key] = _merge_globals(shared[key], value) if key in shared else value
        return merged
    if isinstance(shared, list) and isinstance(own, list):
        return [*shared, *own]
    return own


def _is_intrinsic(value: Mapping[str, Any]) -> bool:
    return len(value) == 1 and next(iter(value)) in _Resolver._functions


def provision(
    template: dict[str, Any],
    *,
    endpoint_url: str,
    region: str = DEFAULT_REGION,
    parameters: dict[str, Any] | None = None,
    stack_name: str | None = None,
) -> Stack:
    """Create the template's tables, queues, topics and keys on the AWS at ``endpoint_url``.

    Physical names start with ``stack_name`` (a short random one by default), so several stacks
    share one server without colliding.
    """
    name = stack_name or f"mb{secrets.token_hex(4)}"
    stack = Stack(
        name=name,
        region=region,
        endpoint_url=endpoint_url,
        account_id="",
        template=template,
        parameters=_parameter_values(template, parameters or {}),
    )
    stack.account_id = stack.client("sts").get_caller_identity()["Account"]
    pseudo = {
        "AWS::AccountId": stack.account_id,
        "AWS::Region": region,
        "AWS::StackName": name,
        "AWS::StackId": (
            f"arn:aws:cloudformation:{region}:{stack.account_id}:stack/{name}/{secrets.token_hex(8)}"
        ),
        "AWS::Partition": "aws",
        "AWS::URLSuffix": "amazonaws.com",
        "AWS::NotificationARNs": [],
        "AWS::NoValue": _NO_VALUE,
    }
    resolver = _Resolver(template, stack.parameters, pseudo)
    stack._resolver = resolver
    resources: dict[str, Any] = template["Resources"]
    order = graphlib.TopologicalSorter(
        {lid: _dependencies(spec, resources) for lid, spec in resources.items()}
    ).static_order()
    try:
        for logical_id in order:
            spec = resources[logical_id]
            if not stack._condition_holds(spec):
                continue
            kind = spec["Type"]
            stack.types[logical_id] = kind
            creator = _CREATORS.get(kind)
            attributes: Mapping[str, Any]
            if creator is None:
                ref, attributes = _placeholder(stack, logical_id, kind, spec.get("Properties") or {})
            else:
                ref, attributes = creator(stack, logical_id, resolver.resolve(spec.get("Properties") or {}))
                stack.created.append(logical_id)
            stack.resources[logical_id] = ref
            resolver.values[logical_id] = ref
            resolver.attributes[logical_id] = attributes
    except Exception:
        stack.delete()
        raise
    return stack


def _dependencies(spec: Mapping[str, Any], resources: Mapping[str, Any]) -> set[str]:
    depends_on = spec.get("DependsOn") or []
    explicit = {depends_on} if isinstance(depends_on, str) else set(depends_on)
    found = references(spec.get("Properties") or {}) | explicit
    return {name for name in found if name in resources}


def _physical_name(stack: Stack, logical_id: str, limit: int) -> str:
    return f"{stack.name}-{logical_id}"[:limit]


# -- creators: (stack, logical id, resolved properties) -> (Ref value, GetAtt attributes)


def _create_table(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    dynamodb = stack.client("dynamodb")
    table_name = props.get("TableName") or _physical_name(stack, logical_id, 255)
    request: dict[str, Any] = {
        "TableName": table_name,
        "KeySchema": props["KeySchema"],
        "AttributeDefinitions": props["AttributeDefinitions"],
        "BillingMode": props.get("BillingMode", "PROVISIONED"),
    }
    for optional in ("ProvisionedThroughput", "GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if optional in props:
            request[optional] = props[optional]
    if "StreamSpecification" in props:
        request["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
    sse = props.get("SSESpecification")
    if sse:
        request["SSESpecification"] = {
            "Enabled": bool(sse.get("SSEEnabled")),
            **{k: sse[k] for k in ("SSEType", "KMSMasterKeyId") if k in sse},
        }
    description = dynamodb.create_table(**request)["TableDescription"]
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        dynamodb.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True},
        )
    pitr = props.get("PointInTimeRecoverySpecification") or {}
    if pitr.get("PointInTimeRecoveryEnabled"):
        dynamodb.update_continuous_backups(
            TableName=table_name,
            PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
        )
    attributes = {"Arn": description["TableArn"]}
    if description.get("LatestStreamArn"):
        attributes["StreamArn"] = description["LatestStreamArn"]
    return table_name, attributes


_QUEUE_ATTRIBUTES = (
    "ContentBasedDeduplication",
    "DelaySeconds",
    "FifoQueue",
    "KmsDataKeyReusePeriodSeconds",
    "KmsMasterKeyId",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "RedrivePolicy",
    "RedriveAllowPolicy",
    "SqsManagedSseEnabled",
    "VisibilityTimeout",
)


def _create_queue(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sqs = stack.client("sqs")
    fifo = _text(props.get("FifoQueue", False)) == "true"
    queue_name = props.get("QueueName") or (
        _physical_name(stack, logical_id, 75) + ".fifo" if fifo else _physical_name(stack, logical_id, 80)
    )
    attributes = {
        key: json.dumps(value) if isinstance(value, dict) else _text(value)
        for key, value in props.items()
        if key in _QUEUE_ATTRIBUTES
    }
    url = sqs.create_queue(QueueName=queue_name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, {"Arn": arn, "QueueName": queue_name, "QueueUrl": url}


def _create_topic(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    topic_name = props.get("TopicName") or _physical_name(stack, logical_id, 256)
    attributes = {k: _text(props[k]) for k in ("DisplayName", "KmsMasterKeyId") if k in props}
    arn = stack.client("sns").create_topic(Name=topic_name, Attributes=attributes)["TopicArn"]
    return arn, {"TopicArn": arn, "TopicName": topic_name}


def _create_key(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kms = stack.client("kms")
    request = {k: props[k] for k in ("Description", "KeyUsage", "KeySpec") if k in props}
    metadata = kms.create_key(**request)["KeyMetadata"]
    if _text(props.get("EnableKeyRotation", False)) == "true":
        kms.enable_key_rotation(KeyId=metadata["KeyId"])
    return metadata["KeyId"], {"Arn": metadata["Arn"], "KeyId": metadata["KeyId"]}


def _create_alias(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    stack.client("kms").create_alias(AliasName=props["AliasName"], TargetKeyId=props["TargetKeyId"])
    return props["AliasName"], {}


def _create_rule(stack: Stack, logical_id: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An EventBridge rule and its targets. moto delivers matching events to SQS targets."""
    events = stack.client("events")
    rule_name = props.get("Name") or _physical_name(stack, logical_id, 64)
    bus = props.get("EventBusName") or "default"
    request: dict[str, Any] = {"Name": rule_name, "EventBusName": bus, "State": props.get("State", "ENABLED")}
    if "EventPattern" in props:
        pattern = props["EventPattern"]
        request["EventPattern"] = pattern if isinstance(pattern, str) else json.dumps(pattern)
    if "ScheduleExpression" in props:
        request["ScheduleExpression"] = props["ScheduleExpression"]
    arn = events.put_rule(**request)["RuleArn"]
    targets = [
        {key: target[key] for key in ("Id", "Arn", "RoleArn", "Input", "InputPath") if key in target}
        for target in props.get("Targets") or []
    ]
    if targets:
        events.put_targets(Rule=rule_name, EventBusName=bus, Targets=targets)
    return f"{bus}|{rule_name}", {"Arn": arn}


_CREATORS = {
    "AWS::DynamoDB::Table": _create_table,
    "AWS::SQS::Queue": _create_queue,
    "AWS::SNS::Topic": _create_topic,
    "AWS::KMS::Key": _create_key,
    "AWS::KMS::Alias": _create_alias,
    "AWS::Events::Rule": _create_rule,
}

_DELETERS = {
    "AWS::DynamoDB::Table": lambda stack, name: stack.client("dynamodb").delete_table(TableName=name),
    "AWS::SQS::Queue": lambda stack, url: stack.client("sqs").delete_queue(QueueUrl=url),
    "AWS::SNS::Topic": lambda stack, arn: stack.client("sns").delete_topic(TopicArn=arn),
    "AWS::KMS::Key": lambda stack, key: stack.client("kms").schedule_key_deletion(
        KeyId=key, PendingWindowInDays=7
    ),
    "AWS::KMS::Alias": lambda stack, alias: stack.client("kms").delete_alias(AliasName=alias),
    "AWS::Events::Rule": lambda stack, ref: _delete_rule(stack.client("events"), *ref.split("|", 1)),
}


def _delete_rule(events: Any, bus: str, rule: str) -> None:
    ids = [t["Id"] for t in events.list_targets_by_rule(Rule=rule, EventBusName=bus).get("Targets", [])]
    if ids:
        events.remove_targets(Rule=rule, EventBusName=bus, Ids=ids)
    events.delete_rule(Name=rule, EventBusName=bus)


class _Attributes(dict[str, Any]):
    """Attributes of a resource the sandbox does not create: any attribute reads as a stable,
    recognisable placeholder."""

    def __init__(self, base: str, known: dict[str, Any]) -> None:
        super().__init__(known)
        self.base = base

    def __missing__(self, attribute: str) -> str:
        return f"{self.base}/{attribute}"


def _placeholder(
    stack: Stack, logical_id: str, kind: str, props: Mapping[str, Any]
) -> tuple[str, _Attributes]:
    """Names for a resource that has no local counterpart, shaped like the real ones."""
    region, account, partition = stack.region, stack.account_id, "aws"
    name = _physical_name(stack, logical_id, 64)
    if kind in FUNCTION_TYPES:
        arn = f"arn:{partition}:lambda:{region}:{account}:function:{name}"
        return name, _Attributes(arn, {"Arn": arn})
    if kind == "AWS::Logs::LogGroup":
        group = _text(stack.resolver.resolve(props["LogGroupName"])) if "LogGroupName" in props else name
        arn = f"arn:{partition}:logs:{region}:{account}:log-group:{group}:*"
        return group, _Attributes(arn, {"Arn": arn})
    if kind == "AWS::IAM::Role":
        arn = f"arn:{partition}:iam::{account}:role/{name}"
        return name, _Attributes(arn, {"Arn": arn, "RoleId": f"AROA{logical_id.upper()[:16]}"})
    if kind == "AWS::IAM::ManagedPolicy":
        arn = f"arn:{partition}:iam::{account}:policy/{name}"
        return arn, _Attributes(arn, {"PolicyArn": arn})
    if kind in ("AWS::Serverless::HttpApi", "AWS::Serverless::Api"):
        api_id = secrets.token_hex(5)
        endpoint = f"https://{api_id}.execute-api.{region}.amazonaws.com"
        return api_id, _Attributes(endpoint, {"ApiEndpoint": endpoint})
    if kind == "AWS::Serverless::LayerVersion":
        arn = f"arn:{partition}:lambda:{region}:{account}:layer:{name}:1"
        return arn, _Attributes(arn, {"Arn": arn})
    service = kind.split("::")[1].lower() if kind.count("::") >= 2 else "sandbox"
    arn = f"arn:{partition}:{service}:{region}:{account}:{name}"
    return name, _Attributes(arn, {"Arn": arn})
