"""The errors of receiving forge webhooks; ciproject.api maps them to HTTP in one place.

Every code is stable: forges show the answer in their delivery logs, and people search for it.
"""

from ciproject.errors import CIError


class WebhookUnauthorized(CIError):
    code = "WEBHOOK_SIGNATURE_INVALID"  # a signature or token that does not match the secret
    http_status = 401


class WebhookSignatureMissing(WebhookUnauthorized):
    code = "WEBHOOK_SIGNATURE_MISSING"  # no signature header at all: a hook without a secret?


class InvalidWebhook(CIError):
    code = "WEBHOOK_INVALID_PAYLOAD"  # not a JSON object, or without what the forge documents


class WebhookEventMissing(InvalidWebhook):
    code = "WEBHOOK_EVENT_MISSING"  # no event header: not a forge's delivery


class WebhookDeliveryMissing(InvalidWebhook):
    code = "WEBHOOK_DELIVERY_MISSING"  # no delivery id: redeliveries could not be recognised


class UnsupportedEvent(CIError):
    code = "WEBHOOK_UNSUPPORTED_EVENT"  # an event kind that builds nothing here (issues, ...)


class WebhookTooLarge(CIError):
    code = "WEBHOOK_TOO_LARGE"
    http_status = 413


class WebhookForgeMismatch(CIError):
    code = "WEBHOOK_FORGE_MISMATCH"  # a GitLab hook sent to the pipeline's GitHub endpoint


class RepositoryNotFound(CIError):
    code = "REPOSITORY_NOT_FOUND"
    http_status = 404


class InvalidRepository(CIError):
    code = "INVALID_REPOSITORY"


class InvalidRun(CIError):
    code = "INVALID_RUN"


class BranchNotFound(CIError):
    code = "BRANCH_NOT_FOUND"
    http_status = 404


class ForgeUnreachable(CIError):
    code = "FORGE_UNREACHABLE"  # git ls-remote failed: the forge down, or refused us
    http_status = 502
