#!/usr/bin/python3
"""Exports scikit-learn's digits data set as the .npy files gradserve-optimizer reads.

    deploy/export_digits.py [--csv FILE] OUT_DIR

Writes OUT_DIR/x.npy (float32 [1797, 64]: the 8x8 images, pixel values 0..16 divided by 16,
so in [0, 1]) and OUT_DIR/y.npy (int64 [1797]: the digit, 0..9), the arrays
sklearn.datasets.load_digits() returns, in its order.

The data is the digits.csv.gz that Debian's python3-sklearn ships (64 pixel columns, then the
label). Only the file is read, never sklearn itself, so the package need not be installed: the
image's build unpacks it with `apt-get download python3-sklearn && dpkg-deb -x` instead of
pulling in scipy and the rest of sklearn's dependencies. Standard library only (no numpy) for
the same reason; the .npy files are the format's version 1.0, which numpy.load reads.
"""

import argparse
import csv
import gzip
import os
import struct
import sys

DEFAULT_CSV = "/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz"
NUM_EXAMPLES = 1797
# The file names under OUT_DIR (tests/deploy/check_manifests.py checks runs name these).
INPUTS_FILE = "x.npy"
TARGETS_FILE = "y.npy"
NUM_FEATURES = 64


def write_npy(path, descr, shape, payload):
    """Writes raw little-endian, C-order bytes under a .npy version 1.0 header."""
    dims = ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "")
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, dims)
    # numpy pads the header with spaces to a multiple of 64 bytes (magic and length included)
    # and ends it with a newline, so the data that follows is aligned.
    prefix_len = 6 + 2 + 2
    pad = -(prefix_len + len(header) + 1) % 64
    header_bytes = (header + " " * pad + "\n").encode("latin1")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00")
        f.write(struct.pack("<H", len(header_bytes)))
        f.write(header_bytes)
        f.write(payload)
    os.replace(tmp, path)  # a reader never sees a half-written file


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--csv", default=DEFAULT_CSV,
                        help="sklearn's digits.csv.gz (default: %(default)s)")
    args = parser.parse_args()

    pixels = []
    labels = []
    with gzip.open(args.csv, "rt", newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) != NUM_FEATURES + 1:
                sys.exit(f"export_digits.py: {args.csv}: a row of {len(row)} columns, "
                         f"expected {NUM_FEATURES + 1}")
            values = [int(float(v)) for v in row]
            if any(v < 0 or v > 16 for v in values[:-1]) or not 0 <= values[-1] <= 9:
                sys.exit(f"export_digits.py: {args.csv}: a value out of range in row {len(labels)}")
            # v / 16 is exact in float32 for v in 0..16, so this is bit-identical to numpy's
            # (data / 16).astype(float32).
            pixels.extend(v / 16.0 for v in values[:-1])
            labels.append(values[-1])
    if len(labels) != NUM_EXAMPLES:
        sys.exit(f"export_digits.py: {args.csv}: {len(labels)} examples, expected {NUM_EXAMPLES}")

    os.makedirs(args.out_dir, exist_ok=True)
    write_npy(os.path.join(args.out_dir, INPUTS_FILE), "<f4", (len(labels), NUM_FEATURES),
              struct.pack("<%df" % len(pixels), *pixels))
    write_npy(os.path.join(args.out_dir, TARGETS_FILE), "<i8", (len(labels),),
              struct.pack("<%dq" % len(labels), *labels))
    print(f"export_digits.py: wrote {args.out_dir}/x.npy (float32 [{len(labels)}, {NUM_FEATURES}]) "
          f"and y.npy (int64 [{len(labels)}])")


if __name__ == "__main__":
    main()
