"""Settings of the example shop: its Celery app lives in :mod:`config.celery_app`."""
