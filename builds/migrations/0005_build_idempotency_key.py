from django.db import migrations, models

UNIQUE = models.UniqueConstraint(
    condition=models.Q(("idempotency_key", ""), _negated=True),
    fields=("pipeline", "idempotency_key"),
    name="build_idempotency_key_unique",
)


class Migration(migrations.Migration):
    # Not atomic: each column is added in a moment (no table rewrite), and the index is built
    # CONCURRENTLY, so builds are read and written meanwhile however many there are. (In one
    # transaction the ADD COLUMN's lock would block them until the index was built.)
    atomic = False

    dependencies = [
        ("builds", "0004_variable_triggered_value_jobrun_resent_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="build",
            name="idempotency_fingerprint",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
        migrations.AddField(
            model_name="build",
            name="idempotency_key",
            field=models.CharField(blank=True, default="", max_length=200),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddConstraint(model_name="build", constraint=UNIQUE)],
            database_operations=[
                migrations.RunSQL(
                    "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS build_idempotency_key_unique"
                    " ON builds_build (pipeline_id, idempotency_key)"
                    " WHERE NOT (idempotency_key = '')",
                    "DROP INDEX CONCURRENTLY IF EXISTS build_idempotency_key_unique",
                )
            ],
        ),
    ]
