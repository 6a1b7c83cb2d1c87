from django.apps import AppConfig


class ForgeConfig(AppConfig):
    name = "forge"
    verbose_name = "Source"
    default_auto_field = "django.db.models.BigAutoField"
