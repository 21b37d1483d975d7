"""A chaos soak of durable: ``make chaos`` (``python -m chaos``).

On throwaway PostgreSQL and Redis servers of its own, real ``celery worker`` processes and two
``durable beat`` processes run about a thousand workflows with sleeps, retries, signals and
parallel steps while workers and beats are SIGKILLed and both servers restarted; then it
checks that every workflow finished and nothing ran, fired or was applied twice or not at
all (:mod:`chaos.checks`). See ``docs/benchmarks.md``.
"""
