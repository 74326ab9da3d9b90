"""Calls itself through ul.call until the platform stops the chain."""
import ultralight as ul


def again(n: int = 0) -> int:
    """Calls again on the same app, forever."""
    return ul.call("loop", "again", n=n + 1)


def ask(question: str, model: str = "claude-3-5-haiku-latest") -> dict:
    """Asks a model through the caller's own key."""
    return ul.ai([{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": question}], model=model)
