"""Issue 13: API keys record the key that minted them, and scopes are enforced.

Scopes were stored and never enforced, so every existing key had its user's full access.
Keys keep what they had: scopes outside the vocabulary of ``flows.permissions.SCOPES`` are
dropped, and a key left with none has full access, as before.
"""

import django.db.models.deletion
from django.db import migrations, models

VOCABULARY = {"read", "run", "operate", "flows", "keys", "credentials", "mcp"}


def keep_existing_access(apps, schema_editor):
    ApiKey = apps.get_model("flows", "ApiKey")
    for key in ApiKey.objects.exclude(scopes=[]).only("pk", "scopes"):
        scopes = key.scopes if isinstance(key.scopes, list) else []
        known = [scope for scope in scopes if scope in VOCABULARY]
        if known != scopes:
            ApiKey.objects.filter(pk=key.pk).update(scopes=known)


class Migration(migrations.Migration):
    dependencies = [
        ("flows", "0004_i17_flow_tool"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="parent",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="children",
                to="flows.apikey",
            ),
        ),
        migrations.RunPython(keep_existing_access, migrations.RunPython.noop),
    ]
