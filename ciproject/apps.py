from django.apps import AppConfig

from ciproject import checks  # noqa: F401  (registers the start-up checks)


class CiprojectConfig(AppConfig):
    name = "ciproject"
