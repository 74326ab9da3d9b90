"""Outbound HTTP from threads, to check the per-call concurrency cap."""
from concurrent.futures import ThreadPoolExecutor

import ultralight as ul


def fetch_many(url: str, n: int = 30) -> list[int]:
    """Fetches url n times from n threads at once; the status codes."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: ul.http.get(url).status_code, range(n)))


def post_json(url: str, payload: dict) -> dict:
    """POSTs JSON and returns the JSON answer."""
    return ul.http.post(url, json=payload).json()


def fetch_error(url: str) -> str:
    """The error message of a refused or failed fetch."""
    try:
        ul.http.get(url)
    except ul.HttpError as exc:
        return str(exc)
    return "no error"
