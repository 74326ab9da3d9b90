"""Tries to reach into its caller's other apps through ul.call."""
import ultralight as ul


def probe(app: str, function: str) -> str:
    """Calls app.function as the caller; returns what happened."""
    try:
        return f"reached: {ul.call(app, function)}"
    except ul.CallError as exc:
        return f"refused: {exc}"
