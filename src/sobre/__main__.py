"""``python -m sobre`` is the ``sobre`` command (so ``torchrun -m sobre fit ...`` works)."""

from sobre.engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
