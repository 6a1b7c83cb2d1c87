from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # Built CONCURRENTLY (outside a transaction): builds are read and written meanwhile,
    # however many there are.
    atomic = False

    dependencies = [
        ("builds", "0012_build_source"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="build",
            index=models.Index(
                condition=models.Q(("status__in", ("QUEUED", "RUNNING", "CANCELLING"))),
                fields=["concurrency_group", "status"],
                name="build_live_in_group",
            ),
        ),
    ]
