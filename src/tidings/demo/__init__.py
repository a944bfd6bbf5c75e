"""Demonstrations run by ``tidings demo``.

:mod:`tidings.demo.bank` walks an event-sourced bank account through commands, an invariant, a
concurrency conflict, time travel and a snapshot, on the embedded SQLite store.

:mod:`tidings.demo.shop` is the reference order-processing system: six services that talk only
through the bus, the checkout as a choreography and as a saga, and the invariants checked after
every run (``python -m tidings.demo.shop --help``).
"""
