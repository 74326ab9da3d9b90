"""Execution and data plane: the arq worker, the sandbox, the SDK bridge, app data and blobs."""


class WorkerError(Exception):
    """Root of errors raised by the worker side."""
