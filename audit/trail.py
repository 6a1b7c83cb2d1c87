"""Who acts, and recording what they do.

The middleware keeps the current request in a contextvar, so record() finds who acts at
record time without a service having to be told: the user of the request (DRF sets
`request._request.user` when it authenticates, and `request._request.auth` to the token),
the token's name, the address. A management command acts for a person in acting_as().
Without either (the controller, beat, a forge's webhook, an anonymous request) nobody
acts and record() writes nothing: the trail is of persons and their tokens."""

import contextvars
import getpass
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings

from audit.actions import Action

_request = contextvars.ContextVar("audit_request", default=None)
_acting = contextvars.ContextVar("audit_acting", default=None)
NOBODY = object()  # unrecorded(): what happens is not the person's doing


@dataclass(frozen=True)
class Actor:
    user: object | None  # the Django user; None for the operator of a command
    username: str
    via: str  # api, admin or cli
    token_name: str = ""
    address: str | None = None


class AuditMiddleware:
    """Keeps the request for record() while it is served (settings.MIDDLEWARE)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = _request.set(request)
        try:
            return self.get_response(request)
        finally:
            _request.reset(token)


@contextmanager
def acting_as(user=None, via: str = "cli"):
    """What runs inside is done by `user`, or, with None, by the operator: the account of
    the operating system running the command (`os:NAME`, without a Django user)."""
    name = user.get_username() if user is not None else f"os:{_os_account()}"
    token = _acting.set(Actor(user, name, via))
    try:
        yield
    finally:
        _acting.reset(token)


@contextmanager
def unrecorded():
    """What runs inside is a consequence the person did not ask for (a policy cancelling
    other builds for their trigger): it is told by what they did, not recorded as theirs."""
    token = _acting.set(NOBODY)
    try:
        yield
    finally:
        _acting.reset(token)


def current_actor() -> Actor | None:
    acting = _acting.get()
    if acting is not None:
        return None if acting is NOBODY else acting
    request = _request.get()
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    return Actor(
        user,
        user.get_username(),
        via="api" if request.path.startswith("/api/") else "admin",
        token_name=token_name(getattr(request, "auth", None)),
        address=client_address(request),
    )


def token_name(auth) -> str:
    """The token's name; '' for a session. Never str(auth): a DRF Token's is its key."""
    if auth is None:
        return ""
    return str(getattr(auth, "name", "") or "token")[:100]


def client_address(request) -> str | None:
    """REMOTE_ADDR; behind TRUSTED_PROXY_COUNT reverse proxies, the address the outermost of
    them saw, which is that many entries from the right of X-Forwarded-For (each proxy
    appends the address it was reached from). Entries further left are whatever the client
    wrote, so they are never taken; without a trusted proxy the header is ignored."""
    address = request.META.get("REMOTE_ADDR")
    proxies = settings.TRUSTED_PROXY_COUNT
    if proxies > 0:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            address = hops[-proxies] if len(hops) >= proxies else hops[0]
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def _os_account() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        return f"uid{os.getuid()}"


def record(action: str, target=None, *, label: str | None = None, **details) -> None:
    """Record `action` on `target` (a model instance) by whoever acts now, in the caller's
    transaction: a change rolled back leaves no event, one committed always has its event.
    Nothing when nobody acts. `details` are names and numbers, JSON: never a secret's
    value, nor a variable's (one may be secret). `label` names a target whose str() is not
    the name to show. A callable `target` gives it, called only when someone acts (so the
    system's own calls never pay for its lookup)."""
    actor = current_actor()
    if actor is None:
        return
    if callable(target):
        target = target()
    # Imported here: `audit` is imported by the services' modules, some before the models load.
    from audit.models import AuditEvent

    AuditEvent.objects.create(
        actor=actor.user,
        username=actor.username,
        token_name=actor.token_name,
        via=actor.via,
        address=actor.address,
        action=Action(action),  # an unknown name is a bug: ValueError
        target_type=target._meta.label_lower if target is not None else "",
        target_id=str(target.pk) if target is not None and target.pk is not None else "",
        target_label=(label if label is not None else str(target or ""))[:200],
        details=details,
    )


def stored(instance, fields: list[str]) -> dict | None:
    """`fields` of `instance` as the database holds them now (before the save that changes
    them; a many-to-many field as its ids); None for a new instance (or none). With
    record_save(), an edit's changed fields."""
    if instance is None or instance.pk is None:
        return None
    columns = [name for name in fields if not instance._meta.get_field(name).many_to_many]
    row = type(instance)._default_manager.only(*columns).filter(pk=instance.pk).first()
    return _values(row, fields) if row is not None else None


def record_save(kind: str, instance, before: dict | None, fields: list[str]) -> None:
    """`KIND.create`, or `KIND.edit` with the names of the fields that changed (nothing when
    none did), after `instance` was saved; `before` is what stored() read."""
    if before is None:
        record(f"{kind}.create", instance)
        return
    after = _values(instance, fields)
    changed = [name for name in fields if before[name] != after[name]]
    if changed:
        record(f"{kind}.edit", instance, changed=changed)


def _values(instance, fields: list[str]) -> dict:
    values = {}
    for name in fields:
        field = instance._meta.get_field(name)
        if field.many_to_many:
            values[name] = sorted(getattr(instance, name).values_list("pk", flat=True))
        else:
            values[name] = getattr(instance, field.attname)
    return values
