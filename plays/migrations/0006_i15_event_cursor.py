"""Issue 15: events numbered per play (``seq``) with a company-wide cursor (``xid``, ``id``)
instead of a company-wide ``seq`` reserved on the company row.

Existing events are renumbered 1, 2, 3 … per play in their old order (payloads too), and
each play's counter is set to its count; their ``xid`` is 0, older than every new one.
"""

from django.db import migrations, models

RENUMBER = {
    "postgresql": [
        """
        UPDATE plays_event e SET seq = r.n, payload = jsonb_set(e.payload, '{seq}', to_jsonb(r.n))
        FROM (SELECT id, row_number() OVER (PARTITION BY play_id ORDER BY seq) AS n FROM plays_event) r
        WHERE e.id = r.id
        """,
    ],
    "sqlite": [
        """
        UPDATE plays_event SET seq = r.n, payload = json_set(plays_event.payload, '$.seq', r.n)
        FROM (SELECT id, row_number() OVER (PARTITION BY play_id ORDER BY seq) AS n FROM plays_event) AS r
        WHERE plays_event.id = r.id
        """,
    ],
}
COUNTERS = """
    UPDATE plays_play SET event_seq = (SELECT COUNT(*) FROM plays_event WHERE plays_event.play_id = plays_play.id)
"""


# Backwards: company-wide numbers again, in cursor order, and the companies' counters.
UNNUMBER = {
    "postgresql": """
        UPDATE plays_event e SET seq = r.n, payload = jsonb_set(e.payload, '{seq}', to_jsonb(r.n))
        FROM (SELECT id, row_number() OVER (PARTITION BY company_id ORDER BY xid, id) AS n FROM plays_event) r
        WHERE e.id = r.id
    """,
    "sqlite": """
        UPDATE plays_event SET seq = r.n, payload = json_set(plays_event.payload, '$.seq', r.n)
        FROM (SELECT id, row_number() OVER (PARTITION BY company_id ORDER BY xid, id) AS n FROM plays_event) AS r
        WHERE plays_event.id = r.id
    """,
}
COMPANY_COUNTERS = """
    UPDATE flows_company SET event_seq = COALESCE(
        (SELECT MAX(seq) FROM plays_event WHERE plays_event.company_id = flows_company.id), 0)
"""


def unnumber(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(UNNUMBER.get(connection.vendor, UNNUMBER["sqlite"]))
        cursor.execute(COMPANY_COUNTERS)


def renumber(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        for sql in RENUMBER.get(connection.vendor, RENUMBER["sqlite"]):
            cursor.execute(sql)
        cursor.execute(COUNTERS)


class Migration(migrations.Migration):
    dependencies = [
        ("plays", "0005_i20_worker_liveness_traceparent"),
    ]

    operations = [
        migrations.RemoveConstraint(model_name="event", name="plays_event_unique_seq"),
        migrations.RemoveIndex(model_name="event", name="plays_event_play_seq"),
        migrations.AddField(
            model_name="event",
            name="xid",
            field=models.BigIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="play",
            name="event_seq",
            field=models.BigIntegerField(default=0, editable=False),
        ),
        migrations.RunPython(renumber, unnumber),
        migrations.AddConstraint(
            model_name="event",
            constraint=models.UniqueConstraint(fields=("play", "seq"), name="plays_event_unique_play_seq"),
        ),
        migrations.AddIndex(
            model_name="event",
            index=models.Index(fields=["company", "xid", "id"], name="plays_event_company_cursor"),
        ),
    ]
