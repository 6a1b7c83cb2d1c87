from django.apps import AppConfig


class AccessConfig(AppConfig):
    name = "access"
    verbose_name = "Teams and access"
    default_auto_field = "django.db.models.BigAutoField"
