from django.apps import AppConfig


class PlaysConfig(AppConfig):
    name = "plays"
    default_auto_field = "django.db.models.BigAutoField"
