"""Returns its own env var, which the platform must not keep in plaintext anywhere."""
import ultralight as ul


def reveal() -> dict:
    """The API_KEY env var, as the app sees it."""
    return {"api_key": ul.env.get("API_KEY")}


def fail_with_it() -> None:
    """Raises an error quoting the env var."""
    raise RuntimeError(f"the key is {ul.env.get('API_KEY')}")
