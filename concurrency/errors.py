from ciproject.errors import CIError


class PipelineQueueFull(CIError):
    code = "PIPELINE_QUEUE_FULL"
    http_status = 409
