"""durable: crash-proof workflows on the Celery you already run.

Public names are re-exported here; ``__all__`` is pinned by a test.
"""

from durable.client import WorkflowRun
from durable.context import WorkflowContext
from durable.errors import (
    ConfigurationError,
    DurableError,
    InvalidAttributes,
    InvalidLimit,
    LimitExceeded,
    LimitKeyError,
    NonDeterminismError,
    PayloadError,
    ResultTimeout,
    SignalTimeout,
    StepFailed,
    StoreUnavailable,
    UnknownWorkflow,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowIdConflict,
    WorkflowNotFound,
    WorkflowNotRunning,
)
from durable.limits import Limit
from durable.retry import RetryPolicy
from durable.runtime import Durable
from durable.step_info import StepInfo, current_step

__all__ = [
    "ConfigurationError",
    "Durable",
    "DurableError",
    "InvalidAttributes",
    "InvalidLimit",
    "Limit",
    "LimitExceeded",
    "LimitKeyError",
    "NonDeterminismError",
    "PayloadError",
    "ResultTimeout",
    "RetryPolicy",
    "SignalTimeout",
    "StepFailed",
    "StepInfo",
    "StoreUnavailable",
    "UnknownWorkflow",
    "WorkflowCancelled",
    "WorkflowContext",
    "WorkflowFailed",
    "WorkflowIdConflict",
    "WorkflowNotFound",
    "WorkflowNotRunning",
    "WorkflowRun",
    "current_step",
]
