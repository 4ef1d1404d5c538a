"""The benchmarks, a development tool kept out of the production apps.

``manage.py bench`` and ``manage.py wsbench`` (``bench/management/commands``), the bench-only
``bench-cpu`` module and bare Celery tasks (``cpu``), the API floor (``floor``), the bench
worker (``python -m bench.worker``) and the process harness the bench and the integration
tests share (``harness``). Listed in ``INSTALLED_APPS`` only where this folder is present (a
checkout); no model, URL or task of the app depends on it.
"""
