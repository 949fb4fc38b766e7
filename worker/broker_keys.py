"""Broker keys left by sdq releases that set kombu's Redis `sep` to ":", renamed to kombu's
default separator (see `app.level_lists` for why sdq keeps the default).

The old separator named the lists of priority levels (`sdq.<hash>:N`), where messages may
still wait, and joined the members of kombu's binding tables (`routing_key:pattern:queue`),
which a publisher with the default separator cannot parse. `sdq worker` runs the rename at
start; it is idempotent, and safe while other up-to-date workers consume.
"""
from __future__ import annotations

from kombu.transport.redis import Channel

from sdq.jobs.broker import QUEUE_PREFIX

LEGACY_SEP = ":"


def upgrade_broker_keys(broker_url: str) -> int:
    """Move waiting messages from old level lists to the current ones (oldest still taken
    first) and rewrite old binding members; returns how many messages moved."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        moved = 0
        for key in client.scan_iter(match=f"{QUEUE_PREFIX}*{LEGACY_SEP}*", _type="list"):
            queue, _, level = key.decode().rpartition(LEGACY_SEP)
            if level.isdigit():
                # kombu pushes on the left and takes from the right: appending on the right
                # of the new list keeps these older messages ahead of any newer ones.
                while client.lmove(key, f"{queue}{Channel.sep}{level}", "LEFT", "RIGHT") is not None:
                    moved += 1
        for key in client.scan_iter(match="_kombu.binding*", _type="set"):
            for member in client.smembers(key):
                fields = member.decode().split(LEGACY_SEP)
                if Channel.sep not in member.decode() and len(fields) == 3:
                    with client.pipeline() as pipe:  # MULTI: never a moment without the member
                        pipe.srem(key, member).sadd(key, Channel.sep.join(fields)).execute()
        return moved
    finally:
        client.close()
