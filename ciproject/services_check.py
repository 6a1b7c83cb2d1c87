"""One clear message naming the service that cannot be reached, instead of a traceback."""

import psycopg
from django.conf import settings
from django.core.management.base import CommandError
from kombu import Connection
from psycopg import sql


def _database_params(dbname: str | None = None) -> dict:
    db = settings.DATABASES["default"]
    return {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "dbname": dbname or db["NAME"],
        "connect_timeout": 5,
    }


def _database_label() -> str:
    db = settings.DATABASES["default"]
    return f"PostgreSQL at {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}/{db['NAME']}"


def check_database(create: bool = False) -> None:
    try:
        psycopg.connect(**_database_params()).close()
        return
    except psycopg.OperationalError as exc:
        missing = "does not exist" in str(exc)
        if not (create and missing):
            raise CommandError(f"{_database_label()} is unreachable: {exc}".strip()) from None
    name = settings.DATABASES["default"]["NAME"]
    with psycopg.connect(**_database_params("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def check_broker() -> None:
    url = settings.CELERY_BROKER_URL
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        safe = Connection(url).as_uri()  # hides the password
        raise CommandError(f"the Celery broker at {safe} is unreachable: {exc}") from None


def require_services(create_database: bool = False) -> None:
    check_database(create=create_database)
    check_broker()
