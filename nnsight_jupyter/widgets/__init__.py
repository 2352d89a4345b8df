"""Notebook views (anywidget), each with a static HTML fallback for places that cannot run widgets."""

from .job_status import JobStatus

__all__ = ["JobStatus"]
