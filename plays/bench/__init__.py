"""Helpers of ``manage.py bench``: the bench-only module, the bare Celery tasks, the worker bootstrap."""
