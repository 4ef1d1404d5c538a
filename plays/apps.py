from django.apps import AppConfig


class PlaysConfig(AppConfig):
    name = "plays"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from flowplay import telemetry

        from . import observe  # noqa: F401  (connects the play's trace context to its creation)

        telemetry.setup_from_env()
