from ciproject.errors import CIError


class InvalidArtifact(CIError):
    code = "INVALID_ARTIFACT"  # a path or checksum that cannot be one


class ArtifactTooLarge(CIError):
    code = "ARTIFACT_TOO_LARGE"
    http_status = 413


class ArtifactIncomplete(CIError):
    code = "ARTIFACT_INCOMPLETE"  # the body ended before its Content-Length: send it again


class ArtifactChecksumMismatch(CIError):
    code = "ARTIFACT_CHECKSUM_MISMATCH"


class JobNotRunning(CIError):
    code = "JOB_NOT_RUNNING"  # the token's attempt has ended, or is not this job's any more
    http_status = 409


class ArtifactNotFound(CIError):
    code = "ARTIFACT_NOT_FOUND"
    http_status = 404


class ArtifactExpired(CIError):
    code = "ARTIFACT_EXPIRED"
    http_status = 410
