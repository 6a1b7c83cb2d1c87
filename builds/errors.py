from ciproject.errors import CIError


class InvalidPipeline(CIError):
    code = "INVALID_PIPELINE"


class InvalidVariables(CIError):
    code = "INVALID_VARIABLES"


class InvalidPriority(CIError):
    code = "INVALID_PRIORITY"


class InvalidIdempotencyKey(CIError):
    code = "INVALID_IDEMPOTENCY_KEY"


class IdempotencyKeyReused(CIError):
    code = "IDEMPOTENCY_KEY_REUSED"
    http_status = 409


class PipelineNameTaken(CIError):
    code = "PIPELINE_NAME_TAKEN"
    http_status = 409


class VariablePartitionMissing(CIError):
    code = "VARIABLE_PARTITION_MISSING"
    http_status = 503


class BuildVariablesMissing(CIError):
    code = "BUILD_VARIABLES_MISSING"
    http_status = 409


class RetryWindowExpired(CIError):
    code = "RETRY_WINDOW_EXPIRED"
    http_status = 409


class BuildNotRetryable(CIError):
    code = "BUILD_NOT_RETRYABLE"
    http_status = 409


class StepNotFound(CIError):
    code = "STEP_NOT_FOUND"
    http_status = 404


class StepNotRetryable(CIError):
    code = "STEP_NOT_RETRYABLE"
    http_status = 409


class BuildAlreadyFinished(CIError):
    code = "BUILD_ALREADY_FINISHED"
    http_status = 409


class PurgeBeforeTooLate(CIError):
    code = "PURGE_BEFORE_TOO_LATE"


class PipelineNotFound(CIError):
    code = "PIPELINE_NOT_FOUND"
    http_status = 404


class BuildNotFound(CIError):
    code = "BUILD_NOT_FOUND"
    http_status = 404


class LogStreamUnavailable(CIError):
    # `?follow=1` of a web process that runs only WSGI: the event stream (which an
    # EventSource accepts alone) is a representation it cannot make.
    code = "LOG_STREAM_UNAVAILABLE"
    http_status = 406
