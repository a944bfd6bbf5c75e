"""Demonstrations run by ``tidings demo``.

:mod:`tidings.demo.bank` walks an event-sourced bank account through commands, an invariant, a
concurrency conflict, time travel and a snapshot, on the embedded SQLite store.
"""
