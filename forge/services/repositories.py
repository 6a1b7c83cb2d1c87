"""A pipeline's repository settings, and its webhook secret: made when the repository is
first set (or rotated), answered once, then kept only encrypted (vault.crypto)."""

import re
import secrets
from urllib.parse import urlsplit

from django.db import transaction
from django.utils import timezone

import audit
from builds.models import Pipeline
from ciproject import git as ciproject_git
from forge.errors import InvalidRepository
from forge.models import Forge, Repository
from vault import crypto
from vault import services as vault

FIELDS = ("forge", "clone_url", "default_branch", "api_url")
FIELDS += ("clone_username", "clone_secret", "status_secret")
# scp-like ssh: git@github.com:owner/repo.git
SCP_LIKE = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s/][^\s]*")
# What git-check-ref-format accepts, roughly, and never an option (`-x`).
BRANCH_RE = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)(?!.*@\{)[^\x00-\x20~^:?*\[\\\x7f]{1,255}(?<![./])")


def _clone_url_refusal(url: str) -> str | None:
    if not isinstance(url, str) or not url or len(url) > 500 or url != url.strip():
        return "a URL of up to 500 characters"
    parts = urlsplit(url)
    if SCP_LIKE.fullmatch(url) or parts.scheme == "ssh":
        return "an https:// URL with a token in clone_secret: ssh (deploy keys) is not supported"
    if parts.scheme not in ciproject_git.SCHEMES or not parts.hostname:
        return "an https://, http:// or git:// URL"
    if parts.username or parts.password is not None:
        # A credential in the URL would land in logs, .git/config and the API's answers.
        return "no credentials in the URL: name a secret in clone_secret"
    return None


def _api_url_refusal(url: str) -> str | None:
    if url == "":
        return None
    parts = urlsplit(url) if isinstance(url, str) else None
    if not parts or parts.scheme not in ("https", "http") or not parts.hostname:
        return "an https:// URL, or empty for the forge's own"
    if parts.username or parts.password:
        return "no credentials in the URL: name a secret in status_secret"
    return None


def validate(pipeline: Pipeline, data: dict) -> dict:
    """The settings as stored, or InvalidRepository naming the first field it refuses."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidRepository(f"{unknown[0]}: unknown field", field=unknown[0])
    values = {"default_branch": "main", "api_url": "", "clone_username": ""}
    values |= {"clone_secret": "", "status_secret": ""} | data
    for name in ("forge", "clone_url"):
        if name not in data:
            raise InvalidRepository(f"{name}: required", field=name)
    for name, value in values.items():
        if not isinstance(value, str):
            raise InvalidRepository(f"{name}: text", field=name)
    checks = {
        "forge": None if values["forge"] in Forge.values else f"one of {', '.join(Forge.values)}",
        "clone_url": _clone_url_refusal(values["clone_url"]),
        "default_branch": None
        if BRANCH_RE.fullmatch(values["default_branch"])
        else "a branch name",
        "api_url": _api_url_refusal(values["api_url"]),
        "clone_username": None
        if re.fullmatch(r"[^\s:]{0,100}", values["clone_username"])
        else "up to 100 characters, no space or colon",
    }
    available = vault.available_to(pipeline)
    for name in ("clone_secret", "status_secret"):
        if values[name] and values[name] not in available:
            checks[name] = (
                f"{values[name]!r} is not a secret of this pipeline (its secrets:"
                f" {', '.join(sorted(available)) or 'none'}); set it first"
            )
    for name, why in checks.items():
        if why:
            raise InvalidRepository(f"{name}: {why}", field=name)
    return values


def new_webhook_secret() -> str:
    return secrets.token_urlsafe(32)


def set_repository(pipeline: Pipeline, data: dict) -> tuple[Repository, str | None]:
    """Create or replace the pipeline's repository settings. The webhook secret comes back
    only when this made it (the first time); otherwise None."""
    values = validate(pipeline, data)
    with transaction.atomic():
        repository = Repository.objects.select_for_update().filter(pipeline=pipeline).first()
        made = repository is None
        shown = None
        if made:
            shown = new_webhook_secret()
            repository = Repository(
                pipeline=pipeline,
                webhook_secret=crypto.encrypt(shown),
                webhook_secret_set_at=timezone.now(),
            )
        before = audit.stored(repository, FIELDS)
        for name, value in values.items():
            setattr(repository, name, value)
        repository.save()
        audit.record_save("repository", repository, before, FIELDS)
    return repository, shown


@transaction.atomic
def rotate_webhook_secret(repository: Repository) -> str:
    """A new webhook secret, answered once; the old one stops working at once."""
    shown = new_webhook_secret()
    Repository.objects.filter(pk=repository.pk).update(
        webhook_secret=crypto.encrypt(shown), webhook_secret_set_at=timezone.now()
    )
    audit.record("repository.rotate_secret", repository)
    return shown


@transaction.atomic
def delete_repository(repository: Repository) -> None:
    audit.record("repository.delete", repository)
    repository.delete()


def webhook_secret(repository: Repository) -> str:
    return crypto.decrypt(bytes(repository.webhook_secret))
