"""Every change of an API token: creation, revocation, rotation. The API, the admin and the
commands (createtoken, ensureadmin) all come here. A token's value is returned once, by the
function that made it, and stored nowhere: only its digest and readable prefix are kept."""

from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from knox.models import get_digest_token

import audit
from builds.models import Pipeline
from tokens.errors import InvalidToken, TokenAlreadyRevoked, TokenBeyondScope, TokenNameTaken
from tokens.models import ACTIONS, PREFIX_LENGTH, ApiToken, Kind


def may_manage(user, token: ApiToken) -> bool:
    """Who may see, revoke or rotate a token: its owner, and staff."""
    return bool(user and user.is_authenticated and (user.is_staff or token.user_id == user.pk))


def _actions(actions: Iterable[str]) -> list[str]:
    chosen = set(actions) | {"read"}  # every token reads
    unknown = sorted(chosen - set(ACTIONS))
    if unknown:
        raise InvalidToken(
            f"unknown actions {', '.join(map(repr, unknown))}: the actions are "
            + ", ".join(ACTIONS)
        )
    return [a for a in ACTIONS if a in chosen]


def _days(days: int | None) -> int:
    days = settings.API_TOKEN_DEFAULT_DAYS if days is None else days
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidToken(f"days must be a whole number of days from 1, not {days!r}")
    if days > settings.API_TOKEN_MAX_DAYS:
        raise InvalidToken(
            f"a token lives at most {settings.API_TOKEN_MAX_DAYS} days (API_TOKEN_MAX_DAYS),"
            f" not {days}"
        )
    return days


def _pipelines(ids: Iterable[int]) -> list[int]:
    ids = sorted(set(ids))
    found = set(Pipeline.objects.filter(pk__in=ids).values_list("pk", flat=True))
    if missing := [i for i in ids if i not in found]:
        raise InvalidToken(f"no pipeline {', '.join(map(str, missing))}")
    return ids


def _within(made_with: ApiToken, actions: list[str], pipelines: list[int], expiry) -> None:
    """A token used to make a token gives it no more than it has: its actions, its
    pipelines, its lifetime."""
    if extra := [a for a in actions if a not in made_with.actions]:
        raise TokenBeyondScope(
            f"this token may not give actions it lacks: {', '.join(extra)}; use a token"
            " that has them, or the admin"
        )
    limited = made_with.pipeline_ids()
    if limited and not (pipelines and set(pipelines) <= limited):
        raise TokenBeyondScope("this token is limited to pipelines; so is any it makes")
    if made_with.expiry is not None and expiry > made_with.expiry:
        raise TokenBeyondScope("a token may not outlive the token that made it")


@transaction.atomic
def create_token(
    owner,
    name: str,
    *,
    actions: Iterable[str] = ("read",),
    days: int | None = None,
    pipelines: Iterable[int] = (),
    kind: str = Kind.PERSONAL,
    made_with: ApiToken | None = None,
) -> tuple[ApiToken, str]:
    """A new token of `owner`'s; answers it and its value, which nothing can show again.
    `made_with`: the API token of the request that asks for it, if any."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise InvalidToken("a token needs a name of 1 to 100 characters")
    if kind not in Kind.values:
        raise InvalidToken(f"kind is one of {', '.join(Kind.values)}, not {kind!r}")
    actions, pipelines = _actions(actions), _pipelines(pipelines)
    lifetime, now = timedelta(days=_days(days)), timezone.now()
    if made_with is not None and made_with.expiry is not None and days is None:
        lifetime = min(lifetime, made_with.expiry - now)  # by default, as long as it may
    if made_with is not None:
        _within(made_with, actions, pipelines, now + lifetime)
    if ApiToken.objects.filter(user=owner, name=name, revoked_at__isnull=True).exists():
        raise TokenNameTaken(f"{owner} already has a token named {name!r}: revoke it or rotate it")
    try:
        with transaction.atomic():
            # knox's value and digest; the expiry set here, from the `now` checked above
            digest, value = get_digest_token()
            token = ApiToken(
                user=owner,
                digest=digest,
                token_key=value[:PREFIX_LENGTH],
                expiry=now + lifetime,
                name=name,
                kind=kind,
                actions=actions,
            )
            token.save(force_insert=True)
    except IntegrityError as exc:  # the same name, made at the same moment
        raise TokenNameTaken(f"{owner} already has a token named {name!r}") from exc
    token.pipelines.set(pipelines)
    audit.record(
        "token.create",
        token,
        label=token.name,
        owner=owner.get_username(),
        actions=actions,
        pipelines=pipelines,
        expires=token.expiry.isoformat(),
        kind=kind,
    )
    return token, value


@transaction.atomic
def revoke_token(token: ApiToken, by) -> ApiToken:
    """Revoke it: from the next request on, it is refused (TOKEN_REVOKED). The row stays,
    for the record."""
    now = timezone.now()
    if not ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=now, revoked_by=by
    ):
        raise TokenAlreadyRevoked(f"the token {token.name!r} was already revoked")
    token.revoked_at, token.revoked_by = now, by
    audit.record("token.revoke", token, label=token.name, owner=token.user.get_username())
    return token


@transaction.atomic
def rotate_token(
    token: ApiToken, by, *, days: int | None = None, made_with: ApiToken | None = None
) -> tuple[ApiToken, str]:
    """A new token with the old one's owner, name, kind and scope, and a new expiry; the
    old one is revoked in the same transaction. A legacy key rotates into an ordinary,
    expiring token."""
    pipelines = list(token.pipelines.values_list("pk", flat=True))
    revoke_token(token, by)
    return create_token(
        token.user,
        token.name,
        actions=token.actions,
        days=days,
        pipelines=pipelines,
        kind=token.kind,
        made_with=made_with,
    )


@transaction.atomic
def issue_token(owner, name: str, *, actions: Iterable[str] = ACTIONS) -> tuple[ApiToken, str]:
    """`owner`'s token `name`, made anew: the live one of that name rotated, or a first one
    (ensureadmin: each run prints a working value without storing one)."""
    current = ApiToken.objects.filter(user=owner, name=name, revoked_at__isnull=True).first()
    if current is not None:
        return rotate_token(current, owner)
    return create_token(owner, name, actions=actions)
