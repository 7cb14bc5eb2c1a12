"""The Python examples that README.md's commands run, at a small size, against a real server,
so the stated results and the committed pictures cannot rot unnoticed (run by
tests/e2e/python_checks.sh, which generates the package and starts the server).

    python_examples.py --target 127.0.0.1:PORT --stubs DIR --examples client/python/examples

1. train_digits.py with SGD and with Adam for 150 steps must reach --min-accuracy 0.9 on the
   held-out digits (measured: 97.5 % and 97.2 %; other seeds no lower than 91.6 %) and write
   its two PNGs for each optimizer;
2. vanishing_gradients.py --check (10 hidden layers, 20 steps) asserts the per-layer gradient
   norms' lesson: the sigmoid chain's vanish, the ReLU chain's less, the residual stack's not.
Needs Debian's python3-sklearn (the digits) and python3-matplotlib (the PNGs): a missing one
fails the test, naming the package, rather than skipping it.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--stubs", required=True, type=Path)
    parser.add_argument("--examples", required=True, type=Path)
    args = parser.parse_args()

    for module, package in (("sklearn", "python3-sklearn"), ("matplotlib", "python3-matplotlib")):
        if importlib.util.find_spec(module) is None:
            print(f"python_examples: {sys.executable} cannot import {module}; install Debian's "
                  f"{package} (deploy/install-deps.sh does)", file=sys.stderr)
            return 1

    failures = 0
    env = dict(os.environ, PYTHONPATH=str(args.stubs.resolve()))

    def run(*argv):
        nonlocal failures
        print("+", *argv, flush=True)
        if subprocess.run([sys.executable, *map(str, argv)], env=env).returncode != 0:
            failures += 1

    with tempfile.TemporaryDirectory(prefix="gradserve-plots-") as plots:
        for optimizer in ("sgd", "adam"):
            run(args.examples / "train_digits.py", "--target", args.target, "--optimizer",
                optimizer, "--steps", 150, "--log-every", 0, "--min-accuracy", 0.9,
                "--plots", plots)
            for png in (f"digits_{optimizer}_loss.png", f"digits_{optimizer}_grad_norms.png"):
                path = Path(plots) / png
                if not path.is_file() or path.read_bytes()[:8] != PNG_SIGNATURE:
                    print(f"train_digits.py --optimizer {optimizer} did not write a PNG {png}",
                          file=sys.stderr)
                    failures += 1
    run(args.examples / "vanishing_gradients.py", "--target", args.target, "--check")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
