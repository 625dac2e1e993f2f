"""Opens and clicks of tracked mail, counted on the message's status record.

The tracking routes add to the record (``msg#<id>``) with one conditional ``UpdateItem`` each:

- ``opens``, ``machine_opens``, ``first_opened_at``, ``last_opened_at``;
- ``clicks``, ``machine_clicks``, ``last_clicked_at``, ``last_click_link``, and per link ``i`` (its
  position in the HTML part) ``click#i`` (count), ``machine_click#i`` and ``link#i`` (its URL).

They never touch ``status`` or ``version``, so they cannot disturb a sender's conditional writes,
and they never create a record: a token for a message whose record has expired still works for
the reader, it is just not counted. The stream carries each change to the event publisher
(``Message Opened``, ``Message Link Clicked``).

Machines open and click too: mail scanners fetch every link of a message within moments of its
arrival, and image proxies fetch the image once on behalf of many opens (or at delivery, for
everyone). Such hits are *flagged* (``machine_*``), never dropped: the record and the events
show both, and the reader decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mailbroker.dynamodb import Table, integer, iso, num, number, text

KEY_PREFIX = "msg#"
# User agents of image proxies, link scanners and HTTP libraries.
_MACHINE_AGENTS = re.compile(
    r"GoogleImageProxy|YahooMailProxy|ggpht\.com|Barracuda|Mimecast|Proofpoint|"
    r"Microsoft Office|ms-office|Outlook-iOS|BingPreview|Slackbot|facebookexternalhit|"
    r"HeadlessChrome|python-requests|python-urllib|Go-http-client|curl/|Wget|"
    r"\bbot\b|crawler|spider|scanner|preview",
    re.IGNORECASE,
)
# A click or open this soon after the message was sent is a scanner at the receiving end.
TOO_SOON_SECONDS = 10.0
# A click on another link of the same message this soon after the last one: a scanner walking
# every link.
LINK_BURST_SECONDS = 2.0


@dataclass(frozen=True)
class Hit:
    """One request to a tracking route."""

    user_agent: str
    at: float


def machine_agent(user_agent: str) -> bool:
    return not user_agent or bool(_MACHINE_AGENTS.search(user_agent))


class EngagementStore:
    def __init__(
        self, dynamodb_client: Any, table: str, *, too_soon_seconds: float = TOO_SOON_SECONDS
    ) -> None:
        self._table = Table(dynamodb_client, table, purpose="for a tracked message")
        self._too_soon = too_soon_seconds

    def record_open(self, message_id: str, hit: Hit) -> bool:
        """Count one open; False when the message has no record."""
        seen = self._table.get(KEY_PREFIX + message_id, consistent=False)
        if seen is None:
            return False
        machine = machine_agent(hit.user_agent) or _too_soon(seen, hit.at, self._too_soon)
        return self._table.update(
            KEY_PREFIX + message_id,
            "ADD opens :one, machine_opens :machine "
            "SET first_opened_at = if_not_exists(first_opened_at, :now), last_opened_at = :now",
            condition="attribute_exists(pk)",
            values={
                ":one": {"N": "1"},
                ":machine": {"N": "1" if machine else "0"},
                ":now": {"N": num(hit.at)},
            },
        )

    def record_click(self, message_id: str, link: int, url: str, hit: Hit) -> bool:
        """Count one click on link ``link``; False when the message has no record."""
        seen = self._table.get(KEY_PREFIX + message_id, consistent=False)
        if seen is None:
            return False
        last_link = integer(seen, "last_click_link")
        burst = (
            last_link not in (None, link) and hit.at - number(seen, "last_clicked_at") < LINK_BURST_SECONDS
        )
        machine = machine_agent(hit.user_agent) or _too_soon(seen, hit.at, self._too_soon) or burst
        return self._table.update(
            KEY_PREFIX + message_id,
            "ADD clicks :one, machine_clicks :machine, #count :one, #machine :machine "
            "SET last_clicked_at = :now, last_click_link = :link, #url = :url",
            condition="attribute_exists(pk)",
            names={"#count": f"click#{link}", "#machine": f"machine_click#{link}", "#url": f"link#{link}"},
            values={
                ":one": {"N": "1"},
                ":machine": {"N": "1" if machine else "0"},
                ":now": {"N": num(hit.at)},
                ":link": {"N": str(link)},
                ":url": {"S": url},
            },
        )


def engagement_of(item: dict[str, Any]) -> dict[str, Any]:
    """What a status record's item (DynamoDB JSON) says about opens and clicks, as
    ``GET /v1/messages/{id}`` shows it; empty when the message is untracked or unseen."""
    shown: dict[str, Any] = {}
    if "opens" in item:
        shown["opens"] = {
            "count": int(number(item, "opens")),
            "machine": int(number(item, "machine_opens")),
            "first_at": iso(number(item, "first_opened_at")),
            "last_at": iso(number(item, "last_opened_at")),
        }
    links = sorted(int(name.split("#", 1)[1]) for name in item if name.startswith("click#"))
    if links:
        shown["clicks"] = [
            {
                "link": link,
                "url": text(item, f"link#{link}"),
                "count": int(number(item, f"click#{link}")),
                "machine": int(number(item, f"machine_click#{link}")),
            }
            for link in links
        ]
    return shown


def _too_soon(seen: dict[str, Any], at: float, window: float) -> bool:
    return text(seen, "status") == "sent" and at - number(seen, "updated_at") < window
