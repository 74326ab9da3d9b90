"""What an app sees: the in-sandbox ``ultralight`` module, its runtime, and tool schemas."""


class SdkError(Exception):
    """Root of errors raised by the SDK's host-side helpers."""
