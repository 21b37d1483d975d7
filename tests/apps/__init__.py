"""Celery apps the tests run in worker processes of their own."""
