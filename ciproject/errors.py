"""The base of every typed error; ciproject.api maps them to HTTP in one place."""


class CIError(Exception):
    code = "ERROR"
    http_status = 400

    def __init__(self, detail: str, **fields):
        super().__init__(detail)
        self.detail = detail
        self.fields = fields
