"""``python -m hyclora.eval``: evaluate a base model or a saved adapter (see hyclora.eval.cli)."""

from hyclora.eval.cli import main

if __name__ == "__main__":
    main()
