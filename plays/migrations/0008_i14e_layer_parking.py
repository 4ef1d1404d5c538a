"""Issue 14: what ``Layer.parked_out`` held, in fields of their own.

``parked_out`` held four things: a sleep's result, ``{"$rerun": true}`` (the module looks
again when the play wakes), ``{"$retry": code}`` (the next attempt begins) and, on an
iterator's layer, ``{"concurrency", "total"}``. Now ``parked`` says which, ``retry_code``
and ``loop_concurrency`` hold their values, and ``parked_out`` only a sleep's result.
"""

from django.db import migrations, models

PARKED_CHOICES = [
    ("", "not parked"),
    ("result", "its result is in parked_out (a sleep)"),
    ("recheck", "the module looks again (a subflow's child, a loop's iterations)"),
    ("retry", "the next attempt begins (after a retry delay)"),
]


def split(apps, schema_editor):
    Layer = apps.get_model("plays", "Layer")
    batch = []
    for layer in Layer.objects.filter(parked_out__isnull=False).iterator(chunk_size=500):
        value, running = layer.parked_out, layer.state == "RUN"
        layer.parked_out = None
        if isinstance(value, dict) and layer.app_id == "iterator" and "concurrency" in value:
            layer.loop_concurrency = int(value.get("concurrency") or 10)
            layer.parked = "recheck" if running else ""
        elif value == {"$rerun": True}:
            layer.parked = "recheck" if running else ""
        elif isinstance(value, dict) and "$retry" in value:
            layer.parked, layer.retry_code = ("retry", str(value["$retry"])[:64]) if running else ("", "")
        elif running:
            layer.parked, layer.parked_out = "result", value
        batch.append(layer)
        if len(batch) >= 500:
            Layer.objects.bulk_update(batch, ["parked", "parked_out", "retry_code", "loop_concurrency"])
            batch = []
    if batch:
        Layer.objects.bulk_update(batch, ["parked", "parked_out", "retry_code", "loop_concurrency"])


def join(apps, schema_editor):
    Layer = apps.get_model("plays", "Layer")
    for layer in Layer.objects.exclude(parked="", loop_concurrency__isnull=True).iterator(chunk_size=500):
        if layer.parked == "recheck" and layer.loop_concurrency is not None:
            layer.parked_out = {"concurrency": layer.loop_concurrency}
        elif layer.parked == "recheck":
            layer.parked_out = {"$rerun": True}
        elif layer.parked == "retry":
            layer.parked_out = {"$retry": layer.retry_code}
        layer.save(update_fields=["parked_out"])


class Migration(migrations.Migration):
    dependencies = [
        ("plays", "0007_i14a_tenancy"),
    ]

    operations = [
        migrations.AddField(
            model_name="layer",
            name="parked",
            field=models.CharField(blank=True, choices=PARKED_CHOICES, default="", max_length=8),
        ),
        migrations.AddField(
            model_name="layer",
            name="retry_code",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
        migrations.AddField(
            model_name="layer",
            name="loop_concurrency",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(split, join),
    ]
