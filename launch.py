"""Entry point: `python launch.py ...` or `mpirun -n N python launch.py ...`."""

from dmoe.cli import main

if __name__ == "__main__":
    main()
