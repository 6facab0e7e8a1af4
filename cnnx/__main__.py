# `python -m cnnx ...` (what `torchrun -m cnnx train ...` runs).
from cnnx.cli import main

if __name__ == "__main__":
    main()
