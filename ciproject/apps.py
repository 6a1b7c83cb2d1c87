from django.apps import AppConfig


class CiprojectConfig(AppConfig):
    name = "ciproject"
