"""Tools that misbehave on purpose, and a well-behaved one to check bystanders."""
import time

import ultralight as ul


def double(x: int) -> int:
    """A bystander: returns twice x."""
    return x * 2


def spin() -> int:
    """Never returns: burns CPU until stopped."""
    while True:
        pass


def hog_memory() -> int:
    """Allocates until the memory limit stops it."""
    blocks = []
    while True:
        blocks.append(bytearray(50_000_000))


def count_and_sleep(seconds: float) -> int:
    """Counts its own runs in storage, then sleeps."""
    runs = ul.load("runs", 0) + 1
    ul.store("runs", runs)
    time.sleep(seconds)
    return runs


def runs() -> int:
    """How many times count_and_sleep started."""
    return ul.load("runs", 0)


def shout(times: int) -> str:
    """Prints a line per time, returns done."""
    for i in range(times):
        print("line", i)
    return "done"
