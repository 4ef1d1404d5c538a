"""Issue 15: events no longer take their numbers from a company-wide counter."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("flows", "0003_i13c_apikey_parent"),
        ("plays", "0006_i15_event_cursor"),
    ]

    operations = [
        migrations.RemoveField(model_name="company", name="event_seq"),
    ]
