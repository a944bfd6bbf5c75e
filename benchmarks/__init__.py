"""Side-by-side benchmarks of tidings against its best peer, run by ``make bench``.

Every scenario runs tidings and the peer (the ``eventsourcing`` library, configured to the same
durability) in the same process on the same machine, on fresh temporary databases, and reports the
ratio tidings / peer against the aim stated in the issue that asked for it. Results are printed as a
table and written to ``benchmarks/results.json`` and ``benchmarks/results.md``.

* :mod:`benchmarks.scenarios_sqlite` -- the event store on SQLite (appends, loads, ``read_all``);
* :mod:`benchmarks.scenarios_processing` -- projections and live handlers on SQLite (issue 3);
* :mod:`benchmarks.scenarios_postgres` -- the event store on PostgreSQL (issue 4), on a throwaway
  durable server (:mod:`benchmarks.pg_server`) unless ``TIDINGS_BENCH_POSTGRES_URL`` names one;
* :mod:`benchmarks.scenarios_bus` -- services in separate processes over NATS JetStream (issue 8)
  against FastStream's NATS broker and raw nats-py, on a throwaway ``nats-server``
  (:mod:`benchmarks.nats_server`) unless ``TIDINGS_BENCH_NATS_URL`` names one. Its consumers run in
  processes of their own (:mod:`benchmarks.bus_apps`, :mod:`benchmarks.bus_worker`,
  :mod:`benchmarks.peer_faststream`).

Run ``python -m benchmarks --help`` for the options; each scenario module explains what it measures
and why it is a like-for-like comparison.
"""
