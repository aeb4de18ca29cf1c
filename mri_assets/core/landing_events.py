"""Change notifications for an S3 landing zone: S3 event notifications delivered to an SQS queue
(MRI_LANDING_QUEUE), read so that noticing a change costs in proportion to the change, not to
the size of the landing zone.

A message is only ever deleted by the caller once what it said is durably recorded (the
landing sensor's committed cursor); until then it comes back after its visibility timeout, and
reading it twice is harmless, because what it adds is a key to look at, not a count.
Notifications can be lost or arrive late (S3 promises at-least-once delivery, not order), so a
periodic full listing still reconciles the landing zone with the catalogue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from mri_assets.core.landing import LANDING_FOLDERS, parse_s3_location

# Seconds a received message stays hidden from other readers. Long enough to outlast the gap
# between two sensor ticks (the one that reads it and the one after its cursor is committed,
# which deletes it); a message not deleted by then is simply read again.
VISIBILITY_SECONDS = 300
# Messages read per sensor tick at most: a burst of uploads is taken over a few ticks rather
# than in one tick that outlives the sensor timeout.
MAX_MESSAGES_PER_TICK = 2000
_BATCH = 10  # SQS hands out at most 10 messages per call


@dataclass(frozen=True)
class LandingChange:
    """One notified change: ``key`` relative to the landing root (``train/a.png``); ``token``
    differs for every event, so a later change of the same key is told from an earlier one."""

    key: str
    removed: bool
    token: str

    @property
    def split(self) -> str:
        return self.key.split("/", 1)[0]


@dataclass(frozen=True)
class ReceivedMessage:
    receipt: str
    changes: tuple[LandingChange, ...]  # within the landing zone; empty for anything else


def changes_in_message(body: str, location: str) -> tuple[LandingChange, ...]:
    """The landing-zone changes an S3 event notification names. Test events, other buckets,
    keys outside the landing prefix and bodies that are not S3 events give none."""
    bucket, prefix = parse_s3_location(location)
    try:
        records = json.loads(body).get("Records", [])
    except (ValueError, AttributeError):
        return ()
    changes = []
    for record in records if isinstance(records, list) else []:
        try:
            name = record["eventName"]
            s3 = record["s3"]
            if s3["bucket"]["name"] != bucket:
                continue
            key = unquote_plus(s3["object"]["key"])  # S3 sends keys URL-encoded
            token = ":".join(
                str(v)
                for v in (
                    name,
                    s3["object"].get("sequencer") or s3["object"].get("eTag", ""),
                    record.get("eventTime", ""),
                )
            )
        except (KeyError, TypeError):
            continue
        if not key.startswith(prefix):
            continue
        relative = key[len(prefix) :]
        if relative.split("/", 1)[0] in LANDING_FOLDERS and "/" in relative:
            changes.append(LandingChange(relative, name.startswith("ObjectRemoved"), token))
    return tuple(changes)


def changes_digest(pending: dict[str, str]) -> str:
    """A digest of pending changes (key -> token): equal digests mean the same changes."""
    lines = "".join(f"{key}\0{pending[key]}\n" for key in sorted(pending))
    return "events:" + hashlib.sha256(lines.encode()).hexdigest()


class LandingQueue:
    """The SQS queue S3 notifies about the landing zone at ``location``; ``client`` is boto3's
    SQS client."""

    def __init__(self, client: Any, queue_url: str, location: str) -> None:
        self.client = client
        self.queue_url = queue_url
        self.location = location

    def receive(self, limit: int = MAX_MESSAGES_PER_TICK) -> list[ReceivedMessage]:
        """Messages waiting now (no long poll: a tick must not wait for news), at most
        ``limit``, each hidden from other readers for VISIBILITY_SECONDS."""
        received: list[ReceivedMessage] = []
        while len(received) < limit:
            reply = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(_BATCH, limit - len(received)),
                VisibilityTimeout=VISIBILITY_SECONDS,
                WaitTimeSeconds=0,
            )
            messages = reply.get("Messages", [])
            if not messages:
                break
            received += [
                ReceivedMessage(m["ReceiptHandle"], changes_in_message(m["Body"], self.location))
                for m in messages
            ]
        return received

    def delete(self, receipts: Iterable[str]) -> None:
        """Forget messages whose changes are recorded. A receipt that expired meanwhile is
        skipped: its message comes back and is read again, which is harmless."""
        self._batched(self.client.delete_message_batch, receipts, {})

    def release(self, receipts: Iterable[str]) -> None:
        """Make messages visible again at once (another split's sensor reads them)."""
        self._batched(
            self.client.change_message_visibility_batch, receipts, {"VisibilityTimeout": 0}
        )

    def _batched(self, call, receipts: Iterable[str], extra: dict) -> None:
        handles = list(receipts)
        for start in range(0, len(handles), _BATCH):
            entries = [
                {"Id": str(n), "ReceiptHandle": h, **extra}
                for n, h in enumerate(handles[start : start + _BATCH])
            ]
            call(QueueUrl=self.queue_url, Entries=entries)
