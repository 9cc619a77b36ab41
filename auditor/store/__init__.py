"""Persistence: the only package of ``auditor`` that imports SQLAlchemy and boto3.

``models`` (tables), ``lifecycle`` (status machine), ``db`` (engines, sessions,
migrations), ``audits`` and ``users`` (the calls web and worker make) and ``artifacts``
(local folder and S3 stores). Shared by ``web/`` and ``worker/``; the ML core never
imports it.
"""
