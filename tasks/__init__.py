"""Example Celery tasks of a shop: the steps its workflows are made of.

Each is an ordinary Celery task taking and returning JSON data; each commits its side effect
in the shop's store (:mod:`tasks.store`) under the step's idempotency key.
"""
