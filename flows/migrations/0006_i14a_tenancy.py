"""Company, User, ApiKey and AuditEntry leave the flows state (tenancy/migrations/0001 has them).

State only, like the move itself: the foreign keys of flows' own models are re-pointed at the
tenancy models, then the four models are deleted from the flows state, their tables kept. The
content types follow (app_label flows → tenancy), so permissions given on them and the admin's
log entries about them stay attached.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

MOVED = ["company", "user", "apikey", "auditentry"]


def relabel(apps, schema_editor, old, new):
    content_type = apps.get_model("contenttypes", "ContentType")
    types = content_type.objects.using(schema_editor.connection.alias)
    for model in MOVED:
        row = types.filter(app_label=old, model=model).first()
        if row is None:
            continue  # a fresh database: post_migrate makes the tenancy types at the end
        # A migrate stopped half-way may have made the new type already, empty: the old one,
        # which permissions and admin log entries point at, takes its place.
        types.filter(app_label=new, model=model).delete()
        row.app_label = new
        row.save(update_fields=["app_label"])
    content_type.objects.clear_cache()


def forwards(apps, schema_editor):
    relabel(apps, schema_editor, "flows", "tenancy")


def backwards(apps, schema_editor):
    relabel(apps, schema_editor, "tenancy", "flows")


class Migration(migrations.Migration):

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        # flows.0005 is replaced by tenancy.0001; flows.0003_i13c is the flows migration before it.
        ("flows", "0003_i13c_apikey_parent"),
        ("tenancy", "0001_initial"),
        # Every foreign key to the flows models is re-pointed before they leave the state.
        ("plays", "0007_i14a_tenancy"),
        ("triggers", "0003_i14a_tenancy"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="credential",
                    name="company",
                    field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="credentials", to="tenancy.company"),
                ),
                migrations.AlterField(
                    model_name="credential",
                    name="created_by",
                    field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="+", to=settings.AUTH_USER_MODEL),
                ),
                migrations.AlterField(
                    model_name="flow",
                    name="company",
                    field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name="flows", to="tenancy.company"),
                ),
                migrations.AlterField(
                    model_name="kv",
                    name="company",
                    field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="kv", to="tenancy.company"),
                ),
                migrations.DeleteModel(name="AuditEntry"),
                migrations.DeleteModel(name="ApiKey"),
                migrations.DeleteModel(name="User"),
                migrations.DeleteModel(name="Company"),
            ],
        ),
        migrations.RunPython(forwards, backwards, elidable=False),
    ]
