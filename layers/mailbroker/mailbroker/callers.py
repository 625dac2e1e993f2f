"""Who is calling: the IAM principal behind an HTTP request or a queued message, and whether an
integration's ``allowed_callers`` (or the stack's ``TokenApiPrincipals``) names it.

An entry names a principal in one of three ways:

- a role or user ARN, ``arn:aws:iam::123456789012:role/app`` (what API Gateway's IAM authoriser
  reports, as the caller's ARN or, for an assumed role, the role's ARN);
- a principal's unique id, ``AROA…`` for a role or ``AIDA…`` for a user: what SQS records as a
  message's ``SenderId`` (``AROA…:session`` for a role), the only identity a queued message
  carries. ``mailbroker integration add --allowed-caller ARN`` adds a role's id next to its ARN
  (IAM ``GetRole``);
- an account id, ``123456789012``: every principal of that account (on the API, the caller's
  account; on the queue, a ``SenderId`` that is the account itself).

A queued message's body says which integration it is for, but only ``SenderId`` says who sent it:
SQS sets it, a sender cannot choose it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ACCOUNT_ID = re.compile(r"\d{12}")
UNIQUE_ID = re.compile(r"A[A-Z]{3}[A-Z0-9]{4,124}")
PRINCIPAL_ARN = re.compile(
    r"arn:aws[a-z-]*:(?:iam|sts)::\d{12}:(?:role|user|assumed-role)/[\w+=,.@/-]{1,512}"
)
_ASSUMED_ROLE = re.compile(r"^arn:(aws[\w-]*):sts::(\d{12}):assumed-role/([^/]+)/.+$")


def entry_problem(entry: str) -> str | None:
    """Why ``entry`` cannot name a principal, or None."""
    if ACCOUNT_ID.fullmatch(entry) or UNIQUE_ID.fullmatch(entry) or PRINCIPAL_ARN.fullmatch(entry):
        return None
    return "must be a role or user ARN, a principal's unique id (AROA..., AIDA...) or a 12-digit account id"


@dataclass(frozen=True)
class Caller:
    arns: frozenset[str] = frozenset()
    unique_id: str | None = None
    account: str | None = None

    @classmethod
    def from_api_event(cls, event: Mapping[str, Any]) -> Caller:
        """The caller as an HTTP API (payload v2) IAM authoriser saw it."""
        iam = ((event.get("requestContext") or {}).get("authorizer") or {}).get("iam") or {}
        arn = str(iam.get("userArn") or "")
        arns = {arn} if arn else set()
        match = _ASSUMED_ROLE.match(arn)
        if match:
            partition, account, role = match.groups()
            arns.add(f"arn:{partition}:iam::{account}:role/{role}")
        user_id = str(iam.get("userId") or "").split(":", 1)[0]
        return cls(frozenset(arns), user_id or None, str(iam.get("accountId") or "") or None)

    @classmethod
    def from_sender_id(cls, sender_id: str) -> Caller:
        """The sender of an SQS message, from its ``SenderId`` attribute."""
        head = sender_id.split(":", 1)[0]
        if ACCOUNT_ID.fullmatch(head):
            return cls(account=head)
        return cls(unique_id=head or None)

    def named_in(self, entries: Iterable[str]) -> bool:
        for entry in entries:
            if entry in self.arns or (self.unique_id and entry == self.unique_id):
                return True
            if self.account and ACCOUNT_ID.fullmatch(entry) and entry == self.account:
                return True
        return False

    def describe(self) -> str:
        """The caller, for an error message (identifiers only, never a credential)."""
        return sorted(self.arns)[0] if self.arns else (self.unique_id or self.account or "an unknown caller")
