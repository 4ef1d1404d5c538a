from django.apps import AppConfig


class TenancyConfig(AppConfig):
    """Companies, users, API keys, the audit log: what every other app builds on."""

    name = "tenancy"
    default_auto_field = "django.db.models.BigAutoField"
