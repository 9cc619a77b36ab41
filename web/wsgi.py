"""The WSGI entry point for gunicorn: ``gunicorn 'web.wsgi:app'``.

Service mode only: it needs REFINE_AUDIT_BROKER_URL (audits go to Celery workers) and a
migrated database (``refine-audit db upgrade`` once per deployment, before the
web processes start, so several of them never race on migrations).
"""

from auditor.logs import configure_logging
from auditor.settings import Settings
from web import create_app

settings = Settings.from_env()
configure_logging(settings.log_format)
app = create_app(settings)
