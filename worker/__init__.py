"""The Celery worker: runs queued audits (``worker.run_audit``) and sweeps for lost work.

``executor`` holds the whole job and is shared with the web app's in-process queue;
``sweep`` recovers audits whose worker died, re-publishes queued audits the broker
lost and retries owed webhooks (``notify``); ``checkpoints`` mirrors REFINE
checkpoints to the artifact store so a restart resumes on any machine; ``broker``
reads what Redis holds. ``celery_app`` and ``tasks`` are the thin Celery wiring around
them; ``cli`` adds ``refine-audit worker``.
"""
