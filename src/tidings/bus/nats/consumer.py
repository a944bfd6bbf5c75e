"""A member of a consumer group on JetStream: partition leases, and one pull loop per held partition.

Membership and leases live in the lease stream (see :mod:`tidings.bus.nats.setup`), one message per
subject, each published with a JetStream per-message TTL of ``lease_ttl`` seconds:

* every ``heartbeat`` seconds a member re-publishes ``...member.<id>`` (its heartbeat) and reads the
  live members (the subjects present in the stream -- a dead member's subject expires);
* the group's partitions (``(source, p)`` pairs, sorted) are dealt round-robin over the sorted member
  ids: every member computes the same assignment from the same member list;
* a member holds a partition by its lease subject ``...lease.<source>.<p>``: it acquires it with
  ``Nats-Expected-Last-Subject-Sequence: 0`` (only if nobody holds it) and renews it with the sequence
  of its own last lease message (only if it still holds it). A partition it should no longer hold it
  releases at once (stops its pull loop after the message in hand, deletes its lease message);
* a member that cannot renew (it lost its connection) stops its pull loops before its leases can
  have expired, so two members never pull one partition except across a pause of the process
  (SIGSTOP, a long GC) longer than the lease: then the batch in hand may be handled twice, which
  the consumer's inbox absorbs; order is still kept, since a new holder does not pull while that
  batch is unacknowledged, and a resumed member pulls no more until its lease is renewed.

Heartbeats run on the member's event loop: a handler that blocks the loop (synchronous I/O waiting
on a lock) for longer than ``lease_ttl`` loses the member its partitions, exactly like a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from tidings.bus.base import (
    BatchHandler,
    Consumer,
    ConsumerGroup,
    ConsumerStatistics,
    Counters,
    DeadLetterHandler,
    Delivery,
    Outcome,
    handle_batch,
    wait_or_stop,
)
from tidings.bus.nats.config import NatsBusConfig
from tidings.bus.nats.setup import ensure_consumer, ensure_lease_stream, ensure_stream
from tidings.events import EventRegistry

__all__ = ["NatsMember"]

log = logging.getLogger("tidings.bus.nats")

_WRONG_LAST_SEQUENCE = {10071, 10164}
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)

Part = tuple[str, int]


class _Worker:
    """The pull loop of one held partition: pull a batch, handle it, acknowledge it, repeat.

    A batch is what the partition holds when the worker asks, up to ``max_batch`` (a pull with
    ``no_wait`` and ``expires``: it waits for the first message, then returns with what is there).
    Order across batches rests on the consumer's ``max_ack_pending`` (= ``max_batch``) and on two
    rules: while messages of an earlier batch may still be unacknowledged (a previous holder that
    died, or settlements of its own that failed) a worker handles nothing until it holds them all
    again, and then handles what it holds in stream order (:meth:`_gather_strays`); and it never
    pulls with a lease it may have lost.
    """

    def __init__(self, member: NatsMember, part: Part, durable: str) -> None:
        self.member = member
        self.part = part
        self.durable = durable
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"bus {member.group.label} {part[0]}/{part[1]}")

    async def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _run(self) -> None:
        m = self.member
        source, p = self.part
        stream = m.config.stream_name(source)
        nc = m.nc
        inbox = nc.new_inbox()
        sub: Subscription | None = None
        # Whatever a previous holder left unacknowledged must come back before anything newer.
        settled = False
        try:
            while not self.stopping.is_set():
                try:
                    if sub is None:
                        sub = await nc.subscribe(inbox)
                    if not m.may_pull(self.part):
                        await wait_or_stop(self.stopping, min(0.25, m.config.fetch_wait))
                        continue
                    if settled:
                        msgs = await self._pull(nc, sub, inbox, stream)
                    else:
                        msgs = await self._gather_strays(nc, sub, inbox, stream)
                        settled = True
                except _NATS_ERRORS as exc:
                    # Disconnected or the server is restarting: the client reconnects by itself.
                    log.debug("%s %s/%d: pull failed: %r", m.group.label, source, p, exc)
                    await wait_or_stop(self.stopping, min(1.0, m.config.fetch_wait))
                    continue
                if not msgs:
                    continue
                try:
                    settled = await self._handle(msgs, source)
                except Exception:
                    # A bug here must not end the loop while the lease is still renewed: that would
                    # stall the partition. The messages come back after ack_wait.
                    log.exception("%s %s/%d: unexpected error settling messages", m.group.label, source, p)
                    settled = False
        finally:
            if sub is not None:
                with contextlib.suppress(*_NATS_ERRORS):
                    await sub.unsubscribe()

    async def _pull(self, nc: Client, sub: Subscription, inbox: str, stream: str) -> list[Msg]:
        """One pull request: wait up to ``fetch_wait`` for the first message, return what is there."""
        m = self.member
        limit = m.group.delivery.max_batch
        wait = m.config.fetch_wait
        request = {"batch": limit, "no_wait": True, "expires": int(wait * 1_000_000_000)}
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self.durable}", json.dumps(request).encode(), reply=inbox
        )
        msgs: list[Msg] = []
        while len(msgs) < limit:
            try:
                msg = await sub.next_msg(timeout=wait + min(1.0, m.config.request_timeout))
            except nats.errors.TimeoutError:
                break
            status = msg.headers.get("Status") if msg.headers else None
            if status is None and msg.reply:
                msgs.append(msg)
                continue
            if status == "100":
                continue  # a heartbeat
            if status not in ("404", "408"):
                log.debug("%s: pull ended with status %s %s", m.group.label, status, msg.headers)
            break  # 404 (nothing more now) or 408 (expired) ends the pull
        return msgs

    async def _gather_strays(self, nc: Client, sub: Subscription, inbox: str, stream: str) -> list[Msg]:
        """The messages an earlier batch left unacknowledged (a holder that died, or settlements of
        our own that failed), with whatever newer ones came with them, in stream order.

        JetStream redelivers unacknowledged messages once their ``ack_wait`` runs out, ahead of
        newer ones; but until then a pull may return newer messages first. So the worker keeps
        pulling, holding what it gets (telling the server it is working on it), until every one
        of the ``num_ack_pending`` messages delivered up to the consumer's last delivered sequence
        is in hand again -- or acknowledged meanwhile -- and hands them all over sorted by stream
        sequence. Gives up after ``ack_wait`` plus a margin (the rest then comes in later pulls).
        """
        m = self.member
        info = await m.js.consumer_info(stream, self.durable)
        strays = info.num_ack_pending or 0
        if not strays:
            return []
        last = info.delivered.stream_seq or 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + m.group.delivery.ack_wait + 2.0
        beat = loop.time()
        held: dict[int, Msg] = {}
        while not self.stopping.is_set() and loop.time() < deadline:
            for msg in await self._pull(nc, sub, inbox, stream):
                held[msg.metadata.sequence.stream] = msg  # a later delivery replaces an earlier one
            if sum(1 for seq in held if seq <= last) >= strays:
                break
            if held and loop.time() - beat > m.group.delivery.ack_wait / 3:
                beat = loop.time()
                for msg in held.values():
                    await msg.in_progress()
            info = await m.js.consumer_info(stream, self.durable)
            if (info.num_ack_pending or 0) <= len(held):
                break  # the others were acknowledged meanwhile (a holder that resumed)
        return [held[seq] for seq in sorted(held)]

    async def _handle(self, msgs: list[Msg], source: str) -> bool:
        """Handle a batch and settle it; False if some settlement may not have reached the server."""
        m = self.member
        deliveries = [Delivery(msg.subject, msg.data, msg.metadata.num_delivered or 1) for msg in msgs]

        async def keepalive(start: int) -> None:
            for msg in msgs[start:]:
                await msg.in_progress()

        outcomes = await handle_batch(
            group=m.group,
            origin=f"bus:{source}",
            deliveries=deliveries,
            registry=m.registry,
            handler=m.handler,
            dead_letter=m.dead_letter,
            counters=m.counters,
            stopping=self.stopping,
            keepalive=keepalive,
        )
        try:
            for msg, outcome in zip(msgs, outcomes, strict=False):
                if outcome is Outcome.ACK:
                    await msg.ack()
                else:
                    await msg.term()
            # Stopping midway: the rest go back at once, in order, ahead of anything newer.
            for msg in msgs[len(outcomes) :]:
                await msg.nak()
            # One round trip for the whole batch: the server has them all when the flush returns.
            await m.nc.flush(timeout=max(1, int(m.config.request_timeout)))
        except _NATS_ERRORS as exc:
            # They come back after ack_wait; the consumer's inbox absorbs the duplicates, and the
            # next pull waits for them (order).
            log.warning("%s: could not settle %d message(s) on %s: %r", m.group.label, len(msgs), source, exc)
            return False
        return True


class NatsMember(Consumer):
    """One member of a consumer group on JetStream (see the module docstring)."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        config: NatsBusConfig,
        group: ConsumerGroup,
        handler: BatchHandler,
        dead_letter: DeadLetterHandler,
        registry: EventRegistry,
    ) -> None:
        self.nc = nc
        self.js = js
        self.config = config
        self.group = group
        self.handler = handler
        self.dead_letter = dead_letter
        self.registry = registry
        self.member = uuid.uuid4().hex
        self.counters = Counters()
        self.durables: dict[Part, str] = {}
        self._parts: list[Part] = []
        self._leases: dict[Part, int] = {}
        self._renewed: dict[Part, float] = {}
        self._workers: dict[Part, _Worker] = {}
        self._heartbeat_seq: int | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Create or check the group's consumers, claim this member's share, start its pull loops."""
        for source in sorted(self.group.sources):
            partitions = await ensure_stream(self.js, self.config, source)
            for p in range(partitions):
                action = await ensure_consumer(self.js, self.config, self.group, source, p)
                self.durables[(source, p)] = action.name
                self._parts.append((source, p))
        await ensure_lease_stream(self.js, self.config)
        await self._tick()
        self._task = asyncio.create_task(self._run(), name=f"bus {self.group.label} leases")

    def may_pull(self, part: Part) -> bool:
        """Whether the lease of ``part`` was renewed recently enough to take more messages (after a
        pause of the process it may have passed to another member: wait for the next renewal)."""
        renewed = self._renewed.get(part)
        if renewed is None:
            return False
        fence = self.config.lease_ttl - self.config.heartbeat_interval
        return asyncio.get_running_loop().time() - renewed < fence

    def held(self) -> tuple[Part, ...]:
        return tuple(sorted(self._workers))

    def statistics(self) -> ConsumerStatistics:
        c = self.counters
        return ConsumerStatistics(
            self.group.label, self.member, c.delivered, c.acked, c.redelivered, c.dead_lettered, self.held()
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Signal every pull loop first: each may wait up to fetch_wait for its pull to end.
        for worker in self._workers.values():
            worker.stopping.set()
        await asyncio.gather(*(self._release(part) for part in list(self._workers)))
        if self._heartbeat_seq is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self.js.delete_msg(self.config.lease_stream, self._heartbeat_seq)

    # -- leases --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat_interval
        while not self._stopping.is_set():
            await wait_or_stop(self._stopping, interval)
            if self._stopping.is_set():
                return
            try:
                await self._tick()
            except Exception as exc:
                # Whatever went wrong, the leases were not renewed: fence as for an outage.
                log.warning("%s: cannot renew leases: %r", self.group.label, exc)
                # Fence ourselves: stop pulling a partition before its lease may have expired and
                # been taken by another member (one heartbeat of margin).
                deadline = self.config.lease_ttl - interval
                for part, renewed in list(self._renewed.items()):
                    if loop.time() - renewed >= deadline:
                        await self._drop(part)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        ttl = self.config.lease_ttl
        ack = await self.js.publish(
            self.config.member_subject(self.group, self.member),
            b"",
            timeout=self.config.request_timeout,
            stream=self.config.lease_stream,
            msg_ttl=ttl,
        )
        self._heartbeat_seq = ack.seq
        members = await self._members()
        members.add(self.member)
        ordered = sorted(members)
        mine = {part for i, part in enumerate(self._parts) if ordered[i % len(ordered)] == self.member}
        # Renew first, all at once: releasing waits for pull loops, and must not delay renewals
        # past the leases' TTL.
        kept = {part: seq for part, seq in self._leases.items() if part in mine}
        started = loop.time()
        renewed = await asyncio.gather(*(self._claim(part, seq) for part, seq in kept.items()))
        for part, new_seq in zip(kept, renewed, strict=True):
            if new_seq is None:
                log.warning("%s: lost the lease of %s/%d", self.group.label, *part)
                await self._drop(part)
            else:
                self._leases[part] = new_seq
                self._renewed[part] = started
        leaving = [part for part in self._leases if part not in mine]
        for part in leaving:
            self._workers[part].stopping.set()
        await asyncio.gather(*(self._release(part) for part in leaving))
        wanted = sorted(mine - set(self._leases))
        started = loop.time()
        claimed = await asyncio.gather(*(self._claim(part, 0) for part in wanted))
        for part, new_seq in zip(wanted, claimed, strict=True):
            if new_seq is not None:
                self._leases[part] = new_seq
                self._renewed[part] = started
                self._workers[part] = _Worker(self, part, self.durables[part])

    async def _members(self) -> set[str]:
        info = await self.js.stream_info(
            self.config.lease_stream, subjects_filter=self.config.members_filter(self.group)
        )
        subjects = info.state.subjects or {}
        return {subject.rsplit(".", 1)[1] for subject in subjects}

    async def _claim(self, part: Part, last_seq: int) -> int | None:
        """Publish the lease of ``part`` if its last message is ``last_seq``; its new sequence, or None."""
        try:
            ack = await self.js.publish(
                self.config.lease_subject(self.group, *part),
                self.member.encode(),
                timeout=self.config.request_timeout,
                stream=self.config.lease_stream,
                headers={"Nats-Expected-Last-Subject-Sequence": str(last_seq)},
                msg_ttl=self.config.lease_ttl,
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    async def _drop(self, part: Part) -> None:
        """Stop pulling ``part`` without touching its lease (it is lost or about to expire)."""
        worker = self._workers.pop(part, None)
        self._leases.pop(part, None)
        self._renewed.pop(part, None)
        if worker is not None:
            await worker.stop()

    async def _release(self, part: Part) -> None:
        """Stop pulling ``part`` after the message in hand, then give its lease up at once."""
        seq = self._leases.get(part)
        await self._drop(part)
        if seq is not None:
            with contextlib.suppress(NotFoundError, *_NATS_ERRORS):
                await self.js.delete_msg(self.config.lease_stream, seq)
