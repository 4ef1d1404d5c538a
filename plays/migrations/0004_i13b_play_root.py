# A play's root (the top of its subflow tree), for FLOWPLAY_MAX_DESCENDANT_PLAYS (issue 13).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("plays", "0004_play_trigger"),
    ]

    operations = [
        migrations.AddField(
            model_name="play",
            name="root",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="plays.play",
            ),
        ),
    ]
