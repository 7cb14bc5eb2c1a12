"""The numpy side of gradclient.sh: writes a committed ONNX test model's batch as .npy files,
and checks the .npy gradients `gradclient compute` wrote against PyTorch's (export_models.py's
JSON), with numpy only.

    compute_onnx.py write REF.json PRECISION DIR   writes DIR/in/*.npy, prints gradclient's
                                                   compute arguments for them, one per line
    compute_onnx.py check REF.json PRECISION DIR   compares DIR/out (and DIR/stdout) with REF

float32 batches are written the awkward ways a user may have them, which the client must
handle: x in Fortran order and the target in float64 (numpy's default), so float32 runs need
--dtype float32; float64 batches are plain C-order float64.
"""

import json
import sys
from pathlib import Path

import numpy as np

TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def json_array(t):
    return np.asarray(t["data"], dtype=np.int64 if t["dtype"] == "int64" else np.float64) \
        .reshape(t["shape"])


def write(ref, precision, directory):
    (directory / "in").mkdir(parents=True)
    args = ["--loss", ref["loss"]]
    for name, tensor in ref["inputs"].items():
        array = json_array(tensor)
        if tensor["dtype"] != "int64":
            array = array.astype(precision)
            if precision == "float32":
                array = np.asfortranarray(array)
        path = directory / "in" / f"{name}.npy"
        np.save(path, array)
        args += ["--input", f"{name}={path}"]
    target = json_array(ref["target"])
    np.save(directory / "in" / "target.npy", target)
    args += ["--loss-target", str(directory / "in" / "target.npy")]
    if ref["options"].get("disable_dropout"):
        args.append("--disable-dropout")
    print("\n".join(args))


def rel_error(got, want):
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


def check(ref, precision, directory):
    case = ref[precision]
    tolerance = TOLERANCE[precision]
    out = directory / "out"
    failures = []
    want = {name: json_array(t) for name, t in case["gradients"].items()}
    files = {p.name for p in out.iterdir()}
    expected_files = {name.replace("/", "_") + ".npy" for name in want} | {"loss.txt", "outputs"}
    if files != expected_files:
        failures.append(f"files in {out}: {sorted(files)}, expected {sorted(expected_files)}")
    stdout = (directory / "stdout").read_text()
    for name, reference in want.items():
        path = out / (name.replace("/", "_") + ".npy")
        if not path.exists():
            continue
        got = np.load(path)
        if got.dtype != np.dtype(precision) or got.shape != reference.shape:
            failures.append(f"{path.name}: {got.dtype} {got.shape}, expected {precision} "
                            f"{reference.shape}")
            continue
        error = rel_error(got, reference)
        if error > tolerance:
            failures.append(f"{name}: relative error {error:.3g} > {tolerance:g}")
        # The summary line: name, shape, norm.
        line = next((line for line in stdout.splitlines() if line.split()[:1] == [name]), "")
        norm = float(line.rsplit("norm ", 1)[1]) if "norm " in line else float("nan")
        if not abs(norm - np.linalg.norm(got.astype(np.float64))) <= 1e-5 * max(norm, 1e-30):
            failures.append(f"{name}: summary line {line!r}, norm {np.linalg.norm(got):.6g}")
    loss = float((out / "loss.txt").read_text())
    if abs(loss - case["loss"]) > tolerance * abs(case["loss"]):
        failures.append(f"loss.txt {loss!r}, PyTorch {case['loss']!r}")
    outputs = sorted((out / "outputs").iterdir()) if (out / "outputs").is_dir() else []
    batch = next(iter(ref["inputs"].values()))["shape"][0]
    if len(outputs) != 1 or np.load(outputs[0]).shape[0] != batch:
        failures.append(f"outputs: {[p.name for p in outputs]}, expected one with batch {batch}")
    label = f"{ref['model']} {precision}"
    for failure in failures:
        print(f"FAIL {label}: {failure}")
    if not failures:
        print(f"ok   {label}: {len(want)} gradient files within {tolerance:g} of PyTorch's, "
              f"loss {loss!r}")
    return 1 if failures else 0


def main():
    command, ref_path, precision, directory = sys.argv[1:]
    ref = json.loads(Path(ref_path).read_text())
    if command == "write":
        write(ref, precision, Path(directory))
        return 0
    return check(ref, precision, Path(directory))


if __name__ == "__main__":
    sys.exit(main())
