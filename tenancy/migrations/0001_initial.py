"""Company, User, ApiKey and AuditEntry move from ``flows`` to ``tenancy``, rows and tables untouched.

The tables keep their names (``db_table``), so this migration creates the four models in the
migration *state* only; flows/0006 deletes them from the flows state. On the way, every
foreign key to them is re-pointed in the state only (plays/0007, triggers/0003, flows/0006):
the database's constraints already name the right tables.

``AUTH_USER_MODEL`` moved from ``flows.User`` to ``tenancy.User``. Django's admin/0001 depends
on the first migration of the user model's app, and on a database made before the move that
admin migration is applied while this one is not, which Django refuses
(InconsistentMigrationHistory). So this migration *replaces* ``flows.0005``, the last flows
migration before the move, as a squashed migration does:

- a database that applied ``flows.0005`` counts this one as applied (nothing of it is run; its
  state operations are what the tables already are) and records it after the next migrate;
- a fresh database runs it in place of ``flows.0005``, whose one operation (dropping
  ``flows_company.event_seq``) is the ``RemoveField`` below.

A database older than ``flows.0005`` migrates with the release before this one first.
"""

import django.contrib.auth.models
import django.contrib.auth.validators
import django.db.models.deletion
import django.db.models.functions.text
import django.utils.timezone
from django.db import migrations, models

import tenancy.ids


class Migration(migrations.Migration):

    initial = True

    replaces = [("flows", "0005_i15_drop_company_event_seq")]

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        # The parents of flows.0005, which this migration stands in for.
        ("flows", "0003_i13c_apikey_parent"),
        ("plays", "0006_i15_event_cursor"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Company',
                    fields=[
                        ('id', models.CharField(default=tenancy.ids.new_id, editable=False, max_length=24, primary_key=True, serialize=False)),
                        ('name', models.CharField(max_length=200)),
                        ('slug', models.SlugField(max_length=200, unique=True)),
                        ('event_seq', models.BigIntegerField(default=0, editable=False)),
                        ('created_at', models.DateTimeField(default=django.utils.timezone.now, editable=False)),
                    ],
                    options={
                        'verbose_name_plural': 'companies',
                        'db_table': 'flows_company',
                    },
                ),
                migrations.CreateModel(
                    name='User',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('password', models.CharField(max_length=128, verbose_name='password')),
                        ('last_login', models.DateTimeField(blank=True, null=True, verbose_name='last login')),
                        ('is_superuser', models.BooleanField(default=False, help_text='Designates that this user has all permissions without explicitly assigning them.', verbose_name='superuser status')),
                        ('username', models.CharField(error_messages={'unique': 'A user with that username already exists.'}, help_text='Required. 150 characters or fewer. Letters, digits and @/./+/-/_ only.', max_length=150, unique=True, validators=[django.contrib.auth.validators.UnicodeUsernameValidator()], verbose_name='username')),
                        ('first_name', models.CharField(blank=True, max_length=150, verbose_name='first name')),
                        ('last_name', models.CharField(blank=True, max_length=150, verbose_name='last name')),
                        ('email', models.EmailField(blank=True, max_length=254, verbose_name='email address')),
                        ('is_staff', models.BooleanField(default=False, help_text='Designates whether the user can log into this admin site.', verbose_name='staff status')),
                        ('is_active', models.BooleanField(default=True, help_text='Designates whether this user should be treated as active. Unselect this instead of deleting accounts.', verbose_name='active')),
                        ('date_joined', models.DateTimeField(default=django.utils.timezone.now, verbose_name='date joined')),
                        ('groups', models.ManyToManyField(blank=True, help_text='The groups this user belongs to. A user will get all permissions granted to each of their groups.', related_name='user_set', related_query_name='user', to='auth.group', verbose_name='groups')),
                        ('user_permissions', models.ManyToManyField(blank=True, help_text='Specific permissions for this user.', related_name='user_set', related_query_name='user', to='auth.permission', verbose_name='user permissions')),
                        ('company', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='users', to='tenancy.company')),
                    ],
                    options={
                        'db_table': 'flows_user',
                    },
                    managers=[
                        ('objects', django.contrib.auth.models.UserManager()),
                    ],
                ),
                migrations.CreateModel(
                    name='ApiKey',
                    fields=[
                        ('id', models.CharField(default=tenancy.ids.new_id, editable=False, max_length=24, primary_key=True, serialize=False)),
                        ('name', models.CharField(max_length=200)),
                        ('prefix', models.CharField(editable=False, max_length=16)),
                        ('token_hash', models.CharField(editable=False, max_length=64, unique=True)),
                        ('scopes', models.JSONField(blank=True, default=list)),
                        ('created_at', models.DateTimeField(default=django.utils.timezone.now, editable=False)),
                        ('last_used_at', models.DateTimeField(blank=True, editable=False, null=True)),
                        ('revoked_at', models.DateTimeField(blank=True, null=True)),
                        ('parent', models.ForeignKey(blank=True, editable=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='children', to='tenancy.apikey')),
                        ('user', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='api_keys', to='tenancy.user')),
                    ],
                    options={
                        'verbose_name': 'API key',
                        'db_table': 'flows_apikey',
                    },
                ),
                migrations.CreateModel(
                    name='AuditEntry',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('actor_name', models.CharField(blank=True, default='', max_length=150)),
                        ('action', models.CharField(max_length=32)),
                        ('object_type', models.CharField(max_length=32)),
                        ('object_id', models.CharField(max_length=64)),
                        ('object_repr', models.CharField(blank=True, default='', max_length=200)),
                        ('details', models.JSONField(blank=True, default=dict)),
                        ('created_at', models.DateTimeField(default=django.utils.timezone.now, editable=False)),
                        ('actor', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='tenancy.user')),
                        ('company', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='tenancy.company')),
                    ],
                    options={
                        'verbose_name': 'audit entry',
                        'verbose_name_plural': 'audit log',
                        'db_table': 'flows_auditentry',
                        'ordering': ['-created_at', '-id'],
                        'indexes': [models.Index(fields=['object_type', 'object_id', '-created_at'], name='flows_audit_object'), models.Index(fields=['company', '-created_at'], name='flows_audit_company')],
                    },
                ),
                migrations.AddConstraint(
                    model_name='user',
                    constraint=models.UniqueConstraint(django.db.models.functions.text.Lower('email'), condition=models.Q(('email', ''), _negated=True), name='flows_user_unique_email'),
                ),
            ],
        ),
        # flows.0005's operation, run only on a fresh database (see the module docstring).
        migrations.RemoveField(model_name="company", name="event_seq"),
    ]
