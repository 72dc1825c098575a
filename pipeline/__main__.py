"""``python -m pipeline`` is the ``medsynth`` CLI (used by ``torchrun -m pipeline train``)."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
