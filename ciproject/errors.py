"""The base of every typed error; ciproject.api maps them to HTTP in one place."""


class CIError(Exception):
    code = "ERROR"
    http_status = 400
    retry_after: int | None = None  # seconds, for an answer the client should send again

    def __init__(self, detail: str, **fields):
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


class InvalidRequest(CIError):
    code = "INVALID_REQUEST"  # the request's shape; `errors` says what, field by field


class DatabaseUnavailable(CIError):
    code = "DATABASE_UNAVAILABLE"
    http_status = 503
    retry_after = 5


class DatabaseBusy(CIError):
    code = "DATABASE_BUSY"  # aborted for a conflict with other work, every time it was tried
    http_status = 503
    retry_after = 1


class InternalError(CIError):
    code = "INTERNAL_ERROR"
    http_status = 500
