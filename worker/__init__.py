"""The Celery worker: runs queued audits (``worker.run_audit``) and reaps lost ones.

``executor`` holds the whole job and is shared with the web app's in-process queue;
``celery_app`` and ``tasks`` are the thin Celery wiring around it; ``cli`` adds
``refine-audit worker``.
"""
