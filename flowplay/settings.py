"""flowplay settings, driven by environment variables.

With no variable set, everything runs embedded: SQLite in ``var/``, Celery on kombu's
filesystem transport and an in-process channel layer fed from the event table. Set
``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``REDIS_URL`` for PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("FLOWPLAY_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), not {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}") from None


def env_count(name: str, default: int) -> int:
    """A non-negative integer (a number of things, e.g. proxies in front of the web process)."""
    value = env_int(name, default)
    if value < 0:
        raise ImproperlyConfigured(f"{name} must be 0 or more, not {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
PRODUCTION = env_bool("FLOWPLAY_PRODUCTION", False)


def var_secret_key(var_dir: Path) -> str:
    """The secret key kept in ``<var>/secret_key``, generated on first use.

    Web, worker and beat start together and must agree: the key is written to a temporary
    file and linked into place, which fails if another process got there first; then
    everyone reads the one file. The file is readable by its owner only.
    """
    import secrets
    import tempfile

    path = var_dir / "secret_key"
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=var_dir, prefix=".secret_key.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(50))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    key = path.read_text().strip()
    if len(key) < 32:
        raise ImproperlyConfigured(f"{path} holds no usable secret key; delete it to have a new one made")
    return key


SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set when FLOWPLAY_PRODUCTION is on")
    # Never a key written in the code: each installation makes its own on first run.
    SECRET_KEY = var_secret_key(VAR_DIR)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc as local static files (no CDN)
    "django_celery_results",
    "channels",
    "tenancy",
    "flows",
    "plays",
    "triggers",
]
# The benchmarks (bench/: manage.py bench, wsbench) are a development tool: installed where
# the folder is present, as in a checkout; a deployment that leaves it out loses nothing.
if (BASE_DIR / "bench" / "__init__.py").exists():
    INSTALLED_APPS.append("bench")

MIDDLEWARE = [
    # Observability (flowplay/logs.py, plays/metrics.py): request id on log lines, latency by route.
    "flowplay.logs.RequestIdMiddleware",
    "plays.metrics.HttpMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from Daphne too (no separate web server in the embedded mode).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After commit, a broker error is reported in the answer, never as a 500 (plays/outbox.py).
    "plays.outbox.BrokerNoticeMiddleware",
]

ROOT_URLCONF = "flowplay.urls"
AUTH_USER_MODEL = "tenancy.User"
# Roles are Django permissions everywhere (API, pages, admin); a user without any role is a
# company member with the members' permissions (tenancy/permissions.py).
AUTHENTICATION_BACKENDS = ["django.contrib.auth.backends.ModelBackend", "tenancy.permissions.MemberBackend"]
# The pages' names are namespaced: the API router already uses "flow-list", "play-detail".
LOGIN_URL = "pages:login"
LOGIN_REDIRECT_URL = "pages:flows"
LOGOUT_REDIRECT_URL = "pages:login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "plays.inbox.waiting_approvals",
            ],
        },
    },
]

WSGI_APPLICATION = "flowplay.wsgi.application"
ASGI_APPLICATION = "flowplay.asgi.application"

# --- Database -------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", "")
if DATABASE_URL:
    # Under ASGI (Daphne) every request runs in a thread of its own, so persistent connections
    # pile up until PostgreSQL refuses clients ("too many clients"), and a new connection per
    # request costs a PostgreSQL backend start each time. On PostgreSQL each process keeps a
    # bounded pool instead (psycopg_pool, Django's "pool" option): a request or a Celery task
    # borrows a connection and gives it back when Django closes it; with CONN_HEALTH_CHECKS the
    # pool checks each one before lending it, so one a database restart broke is replaced.
    # DB_POOL=0 falls back to a connection per request (or DB_CONN_MAX_AGE seconds).
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0))}
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # In-process tests open and close connections on many short-lived threads (consumers, the
    # hub, thread pools), which a bounded pool would hand out until it ran dry: they use a
    # connection per thread; the servers the integration tests start use the pool.
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("DB_POOL", "pytest" not in sys.modules):
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # required with a pool: close = give back
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DB_POOL_MIN_SIZE", 1),
            "max_size": env_int("DB_POOL_MAX_SIZE", 20),
            "timeout": env_float("DB_POOL_TIMEOUT", 10.0),
        }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(VAR_DIR / "flowplay.sqlite3")),
            # Web, worker and scheduler are separate processes on one file: WAL lets readers
            # run beside the writer, IMMEDIATE makes writers queue on the busy timeout
            # instead of failing with "database is locked" on lock upgrade.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
if os.environ.get("FLOWPLAY_TEST_DB_NAME"):
    DATABASES["default"].setdefault("TEST", {})["NAME"] = os.environ["FLOWPLAY_TEST_DB_NAME"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    broker_dir = VAR_DIR / "broker"
    (broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(broker_dir),
        "data_folder_out": str(broker_dir),
        "processed_folder": str(broker_dir / "processed"),
        "control_folder": str(broker_dir / "control"),
        "store_processed": False,
        # kombu's virtual transports poll once a second by default: far too slow here.
        "polling_interval": env_float("CELERY_POLLING_INTERVAL", 0.005),
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Steps are leased in the database and reaped by heartbeat, so a redelivery after
    # the visibility timeout can never run a step twice; keep it long anyway.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)}
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "django-db")
CELERY_RESULT_EXTENDED = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE = {
    "release-due-plays": {"task": "plays.tasks.release_due", "schedule": 0.5, "options": {"expires": 5}},
    "reap-stuck-plays": {
        "task": "plays.tasks.reap_stuck",
        "schedule": env_float("FLOWPLAY_REAP_EVERY_SECONDS", 5.0),
        "options": {"expires": 10},
    },
    "expire-timed-out-plays": {"task": "plays.tasks.expire_timed_out", "schedule": 2.0, "options": {"expires": 10}},
    "prune-channel-requests": {
        "task": "triggers.tasks.prune_requests",
        "schedule": env_float("FLOWPLAY_RETENTION_EVERY_SECONDS", 300.0),
        "options": {"expires": 60},
    },
    # Schedules fire from this one sweep (no ETA tasks: a broker may redeliver those).
    "fire-schedules": {"task": "triggers.tasks.fire_schedules", "schedule": 1.0, "options": {"expires": 5}},
    "prune-old-plays": {
        "task": "plays.tasks.prune_old_plays",
        "schedule": env_float("FLOWPLAY_RETENTION_EVERY_SECONDS", 300.0),
        "options": {"expires": 60},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Channels -------------------------------------------------------------------------
# The channel layer only carries the live stream's doorbells (plays/outbox.py → plays/hub.py):
# Redis pub/sub, one subscription per company per web process. Pub/sub channel names are
# server-wide, not per Redis database: the prefix carries the database's number.
if REDIS_URL:
    from redis.exceptions import ConnectionError as RedisConnectionError

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            # A pooled connection that Redis closed (a restart, a failover, an idle timeout)
            # is reconnected and the command sent again once, instead of failing the caller;
            # the subscriber connection subscribes again by itself when it reconnects, and
            # its health check finds a dead one that no error would show.
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": 30,
                        "retry_on_error": [RedisConnectionError],
                        "health_check_interval": 15,
                    }
                ],
                "prefix": f"flowplay.{urlsplit(REDIS_URL).path.strip('/') or '0'}.",
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Client addresses -----------------------------------------------------------------
# How many reverse proxies in front of the web process append to X-Forwarded-For. 0 (the
# default) trusts none: the client is the connection's address and X-Forwarded-For is
# ignored, so a client cannot pick its own address (and with it a fresh login budget). With
# N, the client is the N-th address from the right of X-Forwarded-For. Everything that
# needs a client's address reads it through DRF's get_ident(), which applies this.
TRUSTED_PROXIES = env_count("FLOWPLAY_TRUSTED_PROXIES", 0)

# --- REST framework -------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenancy.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # The user's role (Django permissions, as in the admin) and the API key's scopes:
    # tenancy/permissions.py.
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "tenancy.permissions.ScopePermission",
        "tenancy.permissions.RolePermission",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["flows.parsers.JSONParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "flows.api.PagePagination",
    "EXCEPTION_HANDLER": "flows.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {"login": env_str("LOGIN_THROTTLE_RATE", "10/min")},
    # Who the client is (the login throttle's key): REMOTE_ADDR unless proxies are trusted.
    "NUM_PROXIES": TRUSTED_PROXIES,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "flowplay API",
    "DESCRIPTION": "Flows, plays, layers and events of a self-hosted workflow engine.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # The spec: every endpoint but login and health needs authentication, the schema too.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated", "tenancy.permissions.ScopePermission"],
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "flows.api.add_error_responses"],
    "ENUM_NAME_OVERRIDES": {
        "PlayStateEnum": "plays.models.State",
        "LayerStateEnum": "plays.models.LayerState",
        "EventTypeEnum": "plays.models.EventType",
        "CredentialKindEnum": "flows.models.CredentialKind",
    },
    # /api/docs (Swagger UI) and /api/redoc load their JavaScript from /static/, not a CDN:
    # self-hosted installs often have no internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Security -------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", PRODUCTION)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", PRODUCTION)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = PRODUCTION
SECURE_HSTS_PRELOAD = PRODUCTION
# X-Forwarded-Proto says "the client used HTTPS" only when a proxy we trust set it: with no
# trusted proxy (the default) any client could send it and pass for a TLS connection.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if PRODUCTION and TRUSTED_PROXIES else None
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("FLOWPLAY_MAX_BODY_BYTES", 2 * 1024 * 1024)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# WhiteNoise serves from the apps' and STATICFILES_DIRS' folders directly, so `make run`
# needs no collectstatic; files collected into STATIC_ROOT are served as well.
WHITENOISE_USE_FINDERS = env_bool("WHITENOISE_USE_FINDERS", True)
try:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # or WhiteNoise warns at every start
except OSError:  # a read-only deployment that serves collected files from elsewhere
    pass

EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if env_str("EMAIL_HOST")
    else "django.core.mail.backends.filebased.EmailBackend",
)
EMAIL_FILE_PATH = str(VAR_DIR / "mail")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 30)
# One variable for SMTP: smtp://user:password@host:port, smtp+tls:// (STARTTLS), smtps:// (TLS).
if EMAIL_URL := env_str("EMAIL_URL"):
    from urllib.parse import unquote, urlsplit

    _email = urlsplit(EMAIL_URL)
    try:
        _email_port = _email.port
    except ValueError:
        _email_port = -1
    if _email.scheme not in ("smtp", "smtp+tls", "smtps") or not _email.hostname or _email_port == -1:
        raise ImproperlyConfigured("EMAIL_URL must look like smtp://user:password@host:port (or smtp+tls://, smtps://)")
    EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
    EMAIL_HOST = _email.hostname
    EMAIL_PORT = _email_port or {"smtps": 465, "smtp+tls": 587}.get(_email.scheme, 25)
    EMAIL_HOST_USER = unquote(_email.username or "")
    EMAIL_HOST_PASSWORD = unquote(_email.password or "")
    EMAIL_USE_TLS = _email.scheme == "smtp+tls"
    EMAIL_USE_SSL = _email.scheme == "smtps"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "flowplay@localhost")

# --- flowplay -------------------------------------------------------------------------
FLOWPLAY = {
    # Largest accepted JSON of a play's args.
    "MAX_ARGS_BYTES": env_int("FLOWPLAY_MAX_ARGS_BYTES", 1024 * 1024),
    # A runner hands the play back to the broker after this long, so one long play
    # cannot starve others queued behind it on the same worker.
    "RUNNER_SLICE_SECONDS": env_float("FLOWPLAY_RUNNER_SLICE_SECONDS", 20.0),
    # A retry delay at least this long parks the play (DEFERRED) instead of holding its worker.
    "RETRY_PARK_SECONDS": env_float("FLOWPLAY_RETRY_PARK_SECONDS", 2.0),
    # How long a runner's lease on a play lasts without a heartbeat.
    "LEASE_SECONDS": env_float("FLOWPLAY_LEASE_SECONDS", 15.0),
    "HEARTBEAT_SECONDS": env_float("FLOWPLAY_HEARTBEAT_SECONDS", 5.0),
    "DEFAULT_STEP_TIMEOUT": env_int("FLOWPLAY_DEFAULT_STEP_TIMEOUT", 300),
    "MAX_ITERATOR_ITEMS": env_int("FLOWPLAY_MAX_ITERATOR_ITEMS", 10000),
    "MAX_SUBFLOW_DEPTH": env_int("FLOWPLAY_MAX_SUBFLOW_DEPTH", 8),
    # Plays one root play may spawn in all (subflows of subflows…): depth is bounded above,
    # this bounds breadth (a flow that starts itself asynchronously in a loop).
    "MAX_DESCENDANT_PLAYS": env_int("FLOWPLAY_MAX_DESCENDANT_PLAYS", 1000),
    # Root plays of one company in RUN at once (0: no limit); more wait DEFERRED for a slot.
    "MAX_RUNNING_PLAYS_PER_COMPANY": env_int("FLOWPLAY_MAX_RUNNING_PLAYS_PER_COMPANY", 50),
    # The largest out a step may produce, as JSON (OUTPUT_TOO_LARGE beyond). Room for a
    # curl download at its 10 MiB limit, which is base64 in the out.
    "MAX_OUTPUT_BYTES": env_int("FLOWPLAY_MAX_OUTPUT_BYTES", 16 * 1024 * 1024),
    # CPU-bound modules (pdf-extract, csv-parse, regex, array-map…) run in a forked process
    # that a timeout or a cancel kills (plays/killable.py); 0 runs them in threads.
    "KILLABLE_STEPS": env_bool("FLOWPLAY_KILLABLE_STEPS", True),
    "CURL_DENY": env_list("FLOWPLAY_CURL_DENY", ["169.254.0.0/16", "fd00:ec2::254/128", "100.100.100.200/32"]),
    "CURL_ALLOW": env_list("FLOWPLAY_CURL_ALLOW", []),
    # Only public addresses (no loopback, private, link-local, 0.0.0.0/8, NAT64, 6to4, mapped
    # forms) unless allow-listed: on in production; the embedded default's tutorial fetches
    # from localhost. See flows/egress.py.
    "CURL_PUBLIC_ONLY": env_bool("FLOWPLAY_CURL_PUBLIC_ONLY", PRODUCTION),
    # A RUN play whose task was lost (no runner, untouched this long) is requeued by reap_stuck.
    "REAP_IDLE_SECONDS": env_float("FLOWPLAY_REAP_IDLE_SECONDS", 30.0),
    # How long a runner retries recording a step's outcome through transient database errors
    # (a restart, a dropped connection) before it gives the play up to the reaper.
    "RECORD_RETRY_SECONDS": env_float("FLOWPLAY_RECORD_RETRY_SECONDS", 60.0),
    # Retention of finished plays (plays/retention.py): days, unless the flow sets retention_days;
    # 0 keeps them for ever. FILTERED plays (nothing ran) go sooner. The newest RETENTION_KEEP
    # finished plays of each flow are always kept. Deleted RETENTION_BATCH plays per transaction.
    "RETENTION_DAYS": env_int("FLOWPLAY_RETENTION_DAYS", 0),
    "RETENTION_FILTERED_DAYS": env_int("FLOWPLAY_RETENTION_FILTERED_DAYS", 7),
    "RETENTION_KEEP": env_int("FLOWPLAY_RETENTION_KEEP", 100),
    "RETENTION_BATCH": env_int("FLOWPLAY_RETENTION_BATCH", 200),
    # HTTP channels (triggers/channels.py): the largest request body a channel takes unless it
    # sets its own, and how long the request log keeps a request (days; the newest
    # HOOK_LOG_KEEP of each channel are kept whatever their age).
    "HOOK_MAX_BODY_BYTES": env_int("FLOWPLAY_HOOK_MAX_BODY_BYTES", 1024 * 1024),
    "HOOK_LOG_DAYS": env_int("FLOWPLAY_HOOK_LOG_DAYS", 14),
    "HOOK_LOG_KEEP": env_int("FLOWPLAY_HOOK_LOG_KEEP", 100),
    # MCP (triggers/mcp.py): how long a tool call waits for its play before it answers with
    # the play id.
    "MCP_TOOL_TIMEOUT_SECONDS": env_float("FLOWPLAY_MCP_TOOL_TIMEOUT_SECONDS", 30.0),
    # A schedule's fire this late is still on time; older ones were missed (the scheduler
    # was down) and follow the schedule's catch-up policy.
    "SCHEDULE_GRACE_SECONDS": env_float("FLOWPLAY_SCHEDULE_GRACE_SECONDS", 60.0),
}

# --- Observability (README "Observability") ---------------------------------------------
FLOWPLAY.update(
    {
        # /metrics: a bearer token, or a client address in these networks (loopback by default).
        "METRICS_TOKEN": env_str("FLOWPLAY_METRICS_TOKEN"),
        "METRICS_ALLOW": env_list("FLOWPLAY_METRICS_ALLOW", ["127.0.0.1/32", "::1/128"]),
        # Flows are labelled by permanentId, at most this many per process; the rest are "other".
        "METRICS_MAX_FLOWS": env_int("FLOWPLAY_METRICS_MAX_FLOWS", 100),
        # A worker counts as live for a queue this long after its last beat (plays/workers.py).
        "WORKER_LIVE_SECONDS": env_float("FLOWPLAY_WORKER_LIVE_SECONDS", 30.0),
        "WORKER_BEAT_SECONDS": env_float("FLOWPLAY_WORKER_BEAT_SECONDS", 10.0),
    }
)
# prometheus_client's multiprocess mode reads this variable when it is first imported, so it is
# set here, before any app module loads. Each test process counts in a folder of its own (pytest-xdist
# workers inherit the controller's environment: a shared folder would sum their counts).
if "pytest" in sys.modules and os.environ.get("FLOWPLAY_METRICS_DIR_OWNER") != str(os.getpid()):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="flowplay-metrics-")
    os.environ["FLOWPLAY_METRICS_DIR_OWNER"] = str(os.getpid())
elif not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(VAR_DIR / "metrics")
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
# One JSON object per line (flowplay/logs.py) in production, plain text in development.
LOG_FORMAT = env_str("LOG_FORMAT", "json" if PRODUCTION else "text").lower()
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, not {LOG_FORMAT!r}")

# Keys that encrypt credentials and KV values (flows/vault.py): the first encrypts, all decrypt.
# Unset: the embedded default generates one into $FLOWPLAY_VAR_DIR/secret-keys.
FLOWPLAY_SECRET_KEYS = env_list("FLOWPLAY_SECRET_KEYS", [])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "flowplay.logs.JsonFormatter"},
    },
    # Credentials (Bearer/Basic tokens, passwords) are masked in every log line; the ids of
    # the play, step and request being handled are added to it.
    "filters": {
        "redact": {"()": "plays.redaction.RedactingFilter"},
        # Credential values revealed to steps in this process, masked by value.
        "secrets": {"()": "flows.vault.SecretLogFilter"},
        "context": {"()": "flowplay.logs.ContextFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["redact", "secrets", "context"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        # One line per task at INFO would be two lines a second from the sweeps alone.
        "celery.app.trace": {"level": env_str("CELERY_TASK_LOG_LEVEL", "WARNING")},
        "celery.worker.strategy": {"level": env_str("CELERY_TASK_LOG_LEVEL", "WARNING")},
        "celery.beat": {"level": "WARNING"},
    },
}
