"""``python -m hypercacheio.cli ...`` (what service files and ``node start`` run)."""

from . import main

if __name__ == "__main__":
    main()
