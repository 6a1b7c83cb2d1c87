"""Files a job uploaded for the jobs that need it. A row exists only for a file stored whole
with the size and sha256 it was sent with: the row is what makes an artifact visible."""

from django.db import models

from builds.models import Build, JobRun


class Artifact(models.Model):
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="artifacts")
    job = models.ForeignKey(JobRun, on_delete=models.CASCADE, related_name="artifacts")
    attempt = models.PositiveIntegerField()  # the job attempt that made it
    path = models.CharField(max_length=1000)  # in the workspace, "/"-separated
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    stored_as = models.CharField(max_length=300)  # its name in the artifacts storage
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    # Its file was deleted at expiry; the row stays, so a job needing it says so.
    expired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job_id", "path"]
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt", "path"], name="artifact_path_unique")
        ]

    def __str__(self) -> str:
        return f"{self.job} / {self.path}"
