"""The builds app's admin, a module a concept: pipelines (edited through the services and
triggered from their page), builds (read-only history with the stage/job/step tree, the step
logs, cancel and retry) and the variable partitions. Importing them registers them."""

from builds.admin.builds import BuildAdmin
from builds.admin.partitions import VariablePartitionAdmin
from builds.admin.pipelines import PipelineAdmin

__all__ = ["BuildAdmin", "PipelineAdmin", "VariablePartitionAdmin"]
