from django.apps import AppConfig


class FlowsConfig(AppConfig):
    name = "flows"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import audit_admin, credential_admin

        audit_admin.register()
        credential_admin.register()
