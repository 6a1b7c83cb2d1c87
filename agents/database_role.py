"""The PostgreSQL role for build agents: exactly the privileges `manage.py runagent` needs,
on the tables it needs them, and nothing else. An agent holds its database credentials on a
build node that runs other people's code; with this role, a leaked agent password cannot read
users, API tokens or pipeline definitions, nor change concurrency policies or whole builds.

`manage.py agentrole NAME` creates the role (or resets it to exactly these grants)."""

from django.apps import apps
from django.db import connection
from psycopg import sql

# table (app label, model): what an agent does there
GRANTS = {
    ("agents", "Agent"): "SELECT, INSERT, UPDATE",  # registers, heartbeats, goes offline
    ("agents", "AgentLease"): "SELECT, INSERT, DELETE",  # whether it is leased, and to whom
    ("agents", "LeaseWait"): "SELECT, DELETE",
    # Reading a build's status under a row lock (a step's end against a cancel) needs UPDATE
    # on some column: `id`, which no UPDATE can change while the build's jobs refer to it.
    ("builds", "Build"): "SELECT, UPDATE (id)",
    ("builds", "JobRun"): "SELECT, UPDATE",  # starts and ends its jobs
    ("builds", "StepRun"): "SELECT, UPDATE",
    ("builds", "StepLogChunk"): "SELECT, INSERT",
    ("builds", "BuildVariable"): "SELECT, INSERT, UPDATE",  # reads them, set-variable
    ("django_celery_results", "TaskResult"): "SELECT, INSERT, UPDATE",  # run_job's result
    # Takes its job's secrets, sealed to its process's key (the role reaches every row).
    ("vault", "SealedSecrets"): "SELECT, UPDATE",
}


def tables() -> dict[str, str]:
    return {apps.get_model(*model)._meta.db_table: grants for model, grants in GRANTS.items()}


def ensure_role(name: str, password: str) -> None:
    """Create the role `name` (LOGIN, with `password`) or reset it: every privilege it had on
    this database's tables goes, then exactly GRANTS are given."""
    role = sql.Identifier(name)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [name])
        verb = "ALTER" if cursor.fetchone() else "CREATE"
        cursor.execute(
            sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
            .format(role, sql.Literal(password))
            .as_string(connection.connection)
        )
        database = sql.Identifier(connection.settings_dict["NAME"])
        for statement in (
            sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(role),
            sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(role),
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, role),
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role),
            *(
                sql.SQL(f"GRANT {grants} ON TABLE {{}} TO {{}}").format(sql.Identifier(table), role)
                for table, grants in tables().items()
            ),
        ):
            cursor.execute(statement.as_string(connection.connection))
