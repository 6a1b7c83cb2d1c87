"""Settings, driven by the environment; the defaults fit a development machine with
PostgreSQL and Redis on localhost. deploy/env.example documents every variable."""

import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from ciproject.sizes import parse_size

BASE_DIR = Path(__file__).resolve().parent.parent
# Where this instance keeps its files (static files, workspaces, the beat schedule): a second
# stack on the same machine gets its own.
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var")).resolve()
# Each worker of a parallel test run (pytest-xdist, `make test`) is a stack of its own, with
# its own metrics files and caches; what it starts inherits the name, so agrees on the folder.
if _test_worker := os.environ.get("PYTEST_XDIST_WORKER"):
    VAR_DIR = VAR_DIR / _test_worker


def env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


SECRET_KEY = os.environ.get("SECRET_KEY", "dev-insecure-change-me")
# Pipeline secrets' own keys (vault.crypto): Fernet keys, newest first, comma-separated. Unset,
# a key is made in SECRETS_KEY_FILE (development); web and the controller need them, agents not.
SECRETS_KEYS = [
    k.strip() for k in os.environ.get("CIPROJECT_SECRETS_KEYS", "").split(",") if k.strip()
]
SECRETS_KEY_FILE = Path(os.environ.get("CIPROJECT_SECRETS_KEY_FILE", VAR_DIR / "secrets.key"))
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    # Before authtoken: its drf_create_token is tokens' (which refuses: plain keys no more).
    "tokens",
    # Kept for its migrations only: tokens' 0002 moves its keys into tokens.ApiToken, hashed
    # (a migration may depend only on an installed app); no authentication class reads it.
    "rest_framework.authtoken",
    "knox",  # the token model's base and its hashing (tokens.models says what we use)
    "drf_spectacular",
    "django_celery_results",
    "ciproject",
    "builds",
    "agents",
    "concurrency",
    "vault",
    "artifacts",
    "forge",
    "access",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "audit.trail.AuditMiddleware",  # who acts, for audit.record (it asks at record time)
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "ciproject.urls"
WSGI_APPLICATION = "ciproject.wsgi.application"

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
            ]
        },
    }
]

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ciproject")
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
}
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env_int(
    "DATABASE_CONNECT_TIMEOUT", 5
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # Artifacts (artifacts.storage): files under ARTIFACTS_ROOT, or any Django storage, e.g.
    # S3-compatible object storage with ARTIFACT_STORAGE_BACKEND=storages.backends.s3.S3Storage
    # and ARTIFACT_STORAGE_OPTIONS='{"bucket_name": "ci", "endpoint_url": "https://..."}'
    # (django-storages; credentials from boto3's usual AWS_* environment variables).
    "artifacts": {
        "BACKEND": os.environ.get(
            "ARTIFACT_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage"
        ),
        "OPTIONS": json.loads(os.environ.get("ARTIFACT_STORAGE_OPTIONS") or "null")
        or {"location": os.environ.get("ARTIFACTS_ROOT", str(VAR_DIR / "artifacts"))},
    },
}
# Caps on what a job uploads: each file, all of a job attempt's, and how many files.
ARTIFACT_MAX_FILE_BYTES = parse_size(os.environ.get("ARTIFACT_MAX_FILE_BYTES") or "1G")
ARTIFACT_MAX_JOB_BYTES = parse_size(os.environ.get("ARTIFACT_MAX_JOB_BYTES") or "4G")
ARTIFACT_MAX_FILES = env_int("ARTIFACT_MAX_FILES", 1000)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tokens.authentication.ApiTokenAuthentication",
        "tokens.authentication.SessionAuthentication",
    ],
    # TokenScope: what the request's API token allows (views that name their own permissions
    # get it through ciproject.permissions.requires); TokenPipelines narrows the lists.
    "DEFAULT_PERMISSION_CLASSES": [
        "ciproject.permissions.ModelPermissions",
        "tokens.permissions.TokenScope",
    ],
    "DEFAULT_FILTER_BACKENDS": ["tokens.permissions.TokenPipelines"],
    "DEFAULT_SCHEMA_CLASS": "ciproject.api.AutoSchema",
    "EXCEPTION_HANDLER": "ciproject.api.exception_handler",
    # JSON only: the API speaks JSON, and form/multipart bodies (file parts) would escape the
    # body size limit below.
    "DEFAULT_PARSER_CLASSES": ["ciproject.api_defaults.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "ciproject.api_defaults.Pagination",
    "PAGE_SIZE": 50,
}
# API tokens (tokens.models): hashed by knox's own hashing; the value is "cip_" and 64 hex
# digits (the prefix lets secret scanners spot a leaked one). A new token lives
# API_TOKEN_DEFAULT_DAYS unless its creator says otherwise, and never more than
# API_TOKEN_MAX_DAYS.
KNOX_TOKEN_MODEL = "tokens.ApiToken"
REST_KNOX = {"TOKEN_PREFIX": "cip_", "AUTH_HEADER_PREFIX": "Token", "TOKEN_MODEL": KNOX_TOKEN_MODEL}
# knox's own migrations make a table for its AuthToken even when TOKEN_MODEL swaps it for
# ours; swapped, it needs none.
MIGRATION_MODULES = {"knox": None}
API_TOKEN_DEFAULT_DAYS = env_int("API_TOKEN_DEFAULT_DAYS", 90)
API_TOKEN_MAX_DAYS = env_int("API_TOKEN_MAX_DAYS", 365)
# A token revoked or expired more than this many days ago is deleted (tokens.retention);
# 0 keeps them for ever.
API_TOKEN_KEEP_DAYS = env_int("API_TOKEN_KEEP_DAYS", 30)
# An API request body above this is refused with 413 REQUEST_TOO_LARGE. DRF reads JSON
# through request.body, where Django's DATA_UPLOAD_MAX_MEMORY_SIZE (also the admin's form
# limit, default 2.5 MB) applies first; keep it no lower so this is the limit that holds.
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024)
# A forge's webhook body (a push of many commits is large; GitHub caps its at 25 MB): above
# this, 413 WEBHOOK_TOO_LARGE and nothing is stored.
WEBHOOK_MAX_BODY_BYTES = env_int("WEBHOOK_MAX_BODY_BYTES", 5 * 1024 * 1024)
# Where people reach web: commit statuses link to a build's page there.
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
DATA_UPLOAD_MAX_MEMORY_SIZE = max(API_MAX_BODY_BYTES, 2_621_440)
SPECTACULAR_SETTINGS = {
    "TITLE": "ciproject API",
    "DESCRIPTION": "Pipelines, builds, steps and their logs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Three choice sets share the field name `status`: named after their classes.
    "ENUM_NAME_OVERRIDES": {
        "BuildStatusEnum": "builds.statuses.BuildStatus",
        "RunStatusEnum": "builds.statuses.RunStatus",
        "AgentStatusEnum": "agents.models.AgentStatus",
    },
}

# Celery: Redis is transport only; PostgreSQL holds every status (DESIGN.md principle 1).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
if CELERY_BROKER_URL.startswith("redis://"):  # kombu's, with a fix: see ciproject/broker.py
    CELERY_BROKER_TRANSPORT = "ciproject.broker:Transport"
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "controller"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A job message stays unacknowledged while its steps run; a redelivery after this
# timeout is harmless (the job's compare-and-set fences it), so keep it long.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 12 * 3600),
    "socket_connect_timeout": 5,
    # More kombu transport options, as JSON: e.g. {"unacked_restore_interval": 1} for Redis
    # to look for messages past their visibility timeout every second.
    **json.loads(os.environ.get("CELERY_TRANSPORT_OPTIONS") or "{}"),
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# RabbitMQ: a worker's control queue is not exclusive to its connection. After a network cut
# the broker keeps the worker's old connection until its heartbeat times out, and an
# exclusive queue held by it would refuse the reconnecting worker (405 RESOURCE_LOCKED, which
# stops the worker). Control messages the old connection swallows meanwhile are lost, which
# the heartbeats make good (agents re-read their state from PostgreSQL).
CELERY_CONTROL_QUEUE_EXCLUSIVE = False
# Celery's Django fixup closes every database connection before and after each task unless
# this is set: a new PostgreSQL session (connect, authenticate, cold caches) per job and per
# advance. Never reached, so connections live as in Django's request cycle instead
# (ciproject.celery: CONN_MAX_AGE, and CONN_HEALTH_CHECKS before each task).
CELERY_DB_REUSE_MAX = 2**62

# Build variables: partitions of VARIABLE_PARTITION_SECONDS (a day), created
# VARIABLE_PARTITIONS_AHEAD ahead, dropped when wholly older than VARIABLE_RETENTION_DAYS. A
# build may be retried while its partition is kept for RETRY_SAFETY_MARGIN_SECONDS more.
VARIABLE_PARTITION_SECONDS = env_int("VARIABLE_PARTITION_SECONDS", 86400)
VARIABLE_PARTITIONS_AHEAD = env_int("VARIABLE_PARTITIONS_AHEAD", 7)
VARIABLE_RETENTION_DAYS = env_int("VARIABLE_RETENTION_DAYS", 90)
RETRY_SAFETY_MARGIN_SECONDS = env_int("RETRY_SAFETY_MARGIN_SECONDS", 86400)
# How long a purge's DETACH or DROP may wait for a lock (they lock builds_build through the
# variables' foreign key, and every build read and write would queue behind the wait); past
# it the purge stops and its next run finishes the job.
VARIABLE_PURGE_LOCK_TIMEOUT_MS = env_int("VARIABLE_PURGE_LOCK_TIMEOUT_MS", 2000)

# The audit trail (audit): events older than this many days are purged (beat, hourly; `manage.py
# audit purge`); 0 keeps them for ever.
AUDIT_RETENTION_DAYS = env_int("AUDIT_RETENTION_DAYS", 365)
# How many reverse proxies stand in front of web, each appending to X-Forwarded-For: the
# trail's address is the one the outermost saw. 0 (none): REMOTE_ADDR, the header ignored
# (anyone can send it).
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)

# Agents and steps.
AGENT_WORKSPACE_ROOT = Path(os.environ.get("AGENT_WORKSPACE_ROOT", VAR_DIR / "workspaces"))
AGENT_HEARTBEAT_SECONDS = env_int("AGENT_HEARTBEAT_SECONDS", 5)
AGENT_OFFLINE_AFTER_SECONDS = env_int("AGENT_OFFLINE_AFTER_SECONDS", 30)
# How often the controller looks for lost agents (beat).
AGENT_SWEEP_SECONDS = float(os.environ.get("AGENT_SWEEP_SECONDS", 5))
# A job waiting for an agent leased to another build ends FAILED after this.
LEASE_WAIT_TIMEOUT_SECONDS = env_int("LEASE_WAIT_TIMEOUT_SECONDS", 1800)
# A job still queued after this while an agent that may run it is idle is sent again (its
# message was lost); the reconcile sweep (beat) looks every RECONCILE_SECONDS.
JOB_RESEND_AFTER_SECONDS = env_int("JOB_RESEND_AFTER_SECONDS", 60)
# How often the reconcile sweep re-drives builds and jobs whose message was lost (a broker
# restart, a controller killed mid-task).
RECONCILE_SECONDS = float(os.environ.get("RECONCILE_SECONDS", 15))
# A job no agent takes within this time ends FAILED (no agent with its label came).
JOB_WAIT_TIMEOUT_SECONDS = env_int("JOB_WAIT_TIMEOUT_SECONDS", 3600)
STEP_KILL_GRACE_SECONDS = float(os.environ.get("STEP_KILL_GRACE_SECONDS", 10))
# An agent whose heartbeat has not reached PostgreSQL for this long (by its own monotonic
# clock) fences itself: it stops its running steps, so that they are dead before the server
# (by the database's clock, after AGENT_OFFLINE_AFTER_SECONDS) hands their slots and leases
# to anyone else. The rule, checked at start-up (ciproject.checks):
# AGENT_FENCE_SECONDS + STEP_KILL_GRACE_SECONDS + 1 <= AGENT_OFFLINE_AFTER_SECONDS.
# Default: the longest that keeps it.
AGENT_FENCE_SECONDS = float(
    os.environ.get("AGENT_FENCE_SECONDS", AGENT_OFFLINE_AFTER_SECONDS - STEP_KILL_GRACE_SECONDS - 1)
)
# A cancel the agents have not confirmed is finished by the watchdog once no agent can still
# be running its steps: AGENT_HEARTBEAT_SECONDS + AGENT_OFFLINE_AFTER_SECONDS + this margin
# after the request (see builds.services.cancellation.force_after); those agents are marked
# suspect.
CANCEL_WATCHDOG_MARGIN_SECONDS = float(os.environ.get("CANCEL_WATCHDOG_MARGIN_SECONDS", 5))
STEP_LOG_MAX_BYTES = env_int("STEP_LOG_MAX_BYTES", 1024 * 1024)
# Threads per web worker process running the WSGI application (ciproject.asgi): requests
# served at once, each with its database connection; the log streams need none.
WEB_THREADS = env_int("WEB_THREADS", 8)
# How often a step's output goes to its log while it keeps printing (a line after a quiet
# spell goes at the runner's next tick): what a follower of the stream waits at most.
STEP_LOG_FLUSH_SECONDS = float(os.environ.get("STEP_LOG_FLUSH_SECONDS", 0.25))
# Where an agent makes its steps' cgroups (a cgroup v2 directory it may write, e.g. its own
# with systemd's Delegate=yes); empty: its own cgroup. Where none can be had, steps are
# contained by their process group only (see agents.process.containment).
AGENT_CGROUP_ROOT = os.environ.get("AGENT_CGROUP_ROOT", "")
# Run steps as this user (runagent --step-user): empty, as the agent's own. The agent then
# needs root (or CAP_SETUID and CAP_SETGID), and the user must reach AGENT_WORKSPACE_ROOT.
AGENT_STEP_USER = os.environ.get("AGENT_STEP_USER", "")
# Limits for a step that sets none of its own (max-processes, max-memory in the YAML); 0 or
# empty: none. An agent that cannot enforce one of these (no such cgroup controller) refuses
# to start.
AGENT_STEP_MAX_PROCESSES = env_int("AGENT_STEP_MAX_PROCESSES", 0)
AGENT_STEP_MAX_MEMORY = parse_size(os.environ.get("AGENT_STEP_MAX_MEMORY") or 0)
# How long an agent keeps a failed job's workspace, so that a step retry goes on there with
# what the earlier steps made (0: never; the retry then runs the job from its first step).
AGENT_KEEP_FAILED_WORKSPACE_SECONDS = env_int("AGENT_KEEP_FAILED_WORKSPACE_SECONDS", 3600)
# The AMQP heartbeat of an agent's broker connections (RabbitMQ; Redis has none): after a
# network cut RabbitMQ drops the agent's old connection, and the control queue it holds,
# within about this, so the agent can consume again soon after the cut heals.
AGENT_BROKER_HEARTBEAT_SECONDS = float(os.environ.get("AGENT_BROKER_HEARTBEAT_SECONDS", 10))
# Web as the agents reach it: they upload and download artifacts there (nothing else of an
# agent calls web).
AGENT_SERVER_URL = os.environ.get("AGENT_SERVER_URL", "http://127.0.0.1:8000").rstrip("/")
# Where an agent keeps its caches (`cache:` of a job), and how much they may take in all:
# the least recently used go first.
AGENT_CACHE_ROOT = Path(os.environ.get("AGENT_CACHE_ROOT", VAR_DIR / "caches"))
AGENT_CACHE_MAX_BYTES = parse_size(os.environ.get("AGENT_CACHE_MAX_BYTES") or "10G")
# Where a build node keeps its bare mirrors of the repositories it checks out (one per
# repository, shared by its agents): a second build fetches only what is new.
AGENT_MIRROR_ROOT = Path(os.environ.get("AGENT_MIRROR_ROOT", VAR_DIR / "mirrors"))
# What the mirrors may take in all: past it, the least recently used go (never one in use).
AGENT_MIRROR_MAX_BYTES = parse_size(os.environ.get("AGENT_MIRROR_MAX_BYTES") or "20G")
# How long an agent keeps retrying a result it could not write (PostgreSQL restarting).
AGENT_DB_RETRY_SECONDS = float(os.environ.get("AGENT_DB_RETRY_SECONDS", 120))

# Metrics (/metrics, Prometheus text format). Events observed in web, controller and beat are
# shared through prometheus-client's multiprocess files in METRICS_DIR (one per host; wiped
# when the stack starts); the state (builds, queues, agents, leases, partitions) is read from
# PostgreSQL at each scrape. /metrics answers a direct request from METRICS_ALLOWED_IPS (one
# that came through a reverse proxy does not count: see ciproject.monitoring), or one
# carrying `Authorization: Bearer $METRICS_TOKEN` when a token is set; others get 403.
METRICS_DIR = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", VAR_DIR / "metrics"))
METRICS_DIR.mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)  # before prometheus_client loads
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
METRICS_ALLOWED_IPS = [
    ip for ip in os.environ.get("METRICS_ALLOWED_IPS", "127.0.0.1,::1").split(",") if ip
]
# A build node serves its agents' own metrics (ciproject_agent_*) on this port; 0: off. Two
# agents on one host need a port each (set it per runagent process).
AGENT_METRICS_PORT = env_int("AGENT_METRICS_PORT", 0)
AGENT_METRICS_ADDR = os.environ.get("AGENT_METRICS_ADDR", "127.0.0.1")

# Logs go to stderr, through one handler, from every process (web, controller, beat, agents;
# Celery's own lines too). LOG_FORMAT=json writes one JSON object a line; either way a line
# logged while working on a build, job or step carries its ids (ciproject.log_format).
LOG_FORMAT = (os.environ.get("LOG_FORMAT") or "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use plain or json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"ids": {"()": "ciproject.log_format.ContextFilter"}},
    "formatters": {
        "plain": {
            "()": "ciproject.log_format.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(id_label)s%(message)s",
        },
        "json": {"()": "ciproject.log_format.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["ids"],
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # Loggers that Django or Celery would otherwise give handlers of their own (in their own
    # format) go to the same one: Django's propagate to the root, Celery's task and
    # multiprocessing loggers (which Celery stops from propagating) use it directly.
    "loggers": {
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "django.server": {"handlers": [], "level": "INFO", "propagate": True},
        "celery.task": {"handlers": ["console"], "propagate": False},
        "multiprocessing": {"handlers": ["console"], "propagate": False},
    },
}
