"""Side-by-side benchmarks of tidings against its best peer, run by ``make bench``.

Every scenario runs tidings and the peer (the ``eventsourcing`` library's SQLite module, configured
to the same durability) in the same process on the same machine, on fresh temporary database files,
and reports the ratio tidings / peer against the aim stated in the issue that asked for it. Results
are printed as a table and written to ``benchmarks/results.json`` and ``benchmarks/results.md``.

Run ``python -m benchmarks --help`` for the options; see :mod:`benchmarks.scenarios_sqlite` for what
each scenario measures and why it is a like-for-like comparison.
"""
