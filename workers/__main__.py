"""``python -m workers``: one worker process configured from the environment."""

from workers.process import main

main()
