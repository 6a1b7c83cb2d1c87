from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_partitions(sender, using="default", **kwargs):
    """Every migrate leaves the variable table with its partitions for now and ahead."""
    from builds import partitions

    partitions.ensure()


class BuildsConfig(AppConfig):
    name = "builds"

    def ready(self):
        post_migrate.connect(_ensure_partitions, sender=self)
