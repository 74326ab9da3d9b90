"""Control plane: HTTP, MCP, auth, dispatch, registry and the command line."""


class GatewayError(Exception):
    """Root of errors raised by the gateway side."""
