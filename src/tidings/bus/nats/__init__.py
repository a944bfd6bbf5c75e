"""The event bus on NATS JetStream (``nats://host:port[,host:port...]``).

**Subjects and streams.** A publishing service ``S`` owns one stream ``TIDINGS_S`` over the subjects
``tidings.S.<partition>.<event type>`` (the type name may span several dot-separated tokens), with
file storage, ``replicas`` copies and limits retention (:mod:`tidings.bus.nats.setup`). One message is
one structured JSON CloudEvent (:mod:`tidings.bus.cloudevents`) with ``Nats-Msg-Id`` = event id, so
the stream drops a re-publish within its ``duplicate_window`` (after a relay crash); a consumer's
inbox de-duplicates beyond it. The publisher computes ``partition = blake2b(stream id) mod N``
(:func:`tidings.bus.partition_of`), ``N`` being fixed per stream and recorded in its metadata.
(A subject transform ``partition(N, token)`` would need the stream id as a subject token, which
would restrict stream ids to subject-safe characters; hashing in the client does not.)

**Ordered consumer groups that scale out.** A consumer group has one durable pull consumer per
partition of each source stream, filtered to its event types, with ``max_ack_pending`` = the group's
``max_batch``. The member holding a partition pulls what it holds (up to ``max_batch``), handles
that batch in order, acknowledges it, and only then pulls again; it never pulls while messages
of an earlier batch may be unacknowledged (a holder that died: it waits until they are redelivered,
which JetStream does first and in stream order), so the events of one aggregate -- all in one
partition -- are handled in order, whichever instance handles them and across redeliveries
(:mod:`tidings.bus.nats.consumer`). Throughput scales with the number of
partitions being worked at once, so the partitions are spread over the group's live instances:
each partition has one active member, holding a lease (JetStream priority groups with pinned
clients would do the same on the server, but nats-py has no API for them; the lease is a message
with a per-message TTL in the ``TIDINGS_LEASES`` stream, acquired and renewed with
``Nats-Expected-Last-Subject-Sequence`` -- see :mod:`tidings.bus.nats.consumer`). Members heartbeat,
agree on the sorted member list and deal the partitions round-robin, so N instances hold about
``partitions / N`` partitions each; scaling beyond the partition count adds no throughput.

**Failover bound.** When an instance dies (SIGKILL, lost host), its partitions are handled again by
the others within::

    lease_ttl + heartbeat + 1 s (TTL resolution)      -- its leases expire and are re-dealt
    max(that, ack_wait) + fetch_wait                   -- and the batch it had in hand is redelivered

(defaults: ``lease_ttl`` 6 s, ``heartbeat`` 2 s, ``ack_wait`` 30 s -- set ``ack_wait`` lower for a
faster failover: a live member extends it while its handler runs). An instance that stops cleanly
releases its leases at once (the others take them at their next heartbeat). One rare case adds
``ack_wait``: a pull the server answered just as its member let the partition go leaves that message
unacknowledged until ``ack_wait`` runs out. A stalled instance (SIGSTOP) past its lease and
``ack_wait`` loses its partitions the same way; when it resumes it may finish the message it had
in hand -- duplicates its service's inbox absorbs -- then finds its leases gone and stops pulling.

**Retries and dead letters.** A failed message is retried by the member that holds it, after the
group's back-off (the messages after it in its batch wait; those before it are acknowledged); its
``attempt`` counts on from JetStream's ``num_delivered``, and after ``max_deliver`` attempts it goes
to the dead-letter callback and is terminated, so a poison message blocks its partition only for
its retries. A message that cannot be decoded is dead-lettered at its first delivery.
"""

from tidings.bus.nats.bus import NatsBus
from tidings.bus.nats.config import NatsBusConfig

__all__ = ["NatsBus", "NatsBusConfig"]
