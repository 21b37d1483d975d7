"""Benchmarks: the latency of a durable workflow against the same plain Celery chain.

Run ``python -m bench.run`` (or ``make bench``); ``bench/README.md`` explains each number.
"""
