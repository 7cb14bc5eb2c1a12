#!/usr/bin/python3
"""Checks gradserve.client's TLS, mutual TLS and bearer-token options against a real server.

    python_tls_token.py --target 127.0.0.1:PORT --pki DIR --stubs DIR --client-dir client/python

The server (started by python_tls_token.sh) serves TLS with DIR/server.pem, requires client
certificates signed by DIR/ca.pem, and the bearer token in DIR/token. Every way in that should
work is checked to work, and every way that should not is checked to fail with the expected
status code, so that a client that silently drops the certificate or the token, or falls back
to plaintext, cannot pass. Exits non-zero on any failed check.
"""

import argparse
import os
import sys
from pathlib import Path

# Seconds per call: generous for a loaded machine, yet a hung handshake fails the check rather
# than the whole CTest run.
TIMEOUT = 10.0
SERVICE = "gradserve.v1.GradientService"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--stubs", required=True, type=Path)
    parser.add_argument("--client-dir", required=True, type=Path)
    args = parser.parse_args()

    # Stubs first, so that "gradserve.v1" is the freshly generated package, then the library.
    sys.path[:0] = [str(args.stubs.resolve()), str(args.client_dir.resolve())]
    import grpc
    import numpy as np

    from gradserve import client as gc

    pki = args.pki
    pem = lambda name: str(pki / name)  # noqa: E731
    token = (pki / "token").read_text().strip()
    mtls = dict(root_ca_file=pem("ca.pem"), cert_file=pem("client.pem"),
                key_file=pem("client.key"))
    failures = []

    def check(ok: bool, what: str):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    stub_file = Path(gc.pb.__file__).resolve()
    check(args.stubs.resolve() in stub_file.parents, f"stubs come from {args.stubs} ({stub_file})")

    # Linear(4 -> 2) -> ReLU -> MSE, float64, with its closed-form gradients: a call that
    # succeeds must also compute the right thing.
    rng = np.random.default_rng(11)
    x, w, b, t = (rng.standard_normal(s) for s in ((8, 4), (2, 4), (2,), (8, 2)))
    z = x @ w.T + b
    delta = (2.0 / z.size) * (np.maximum(z, 0) - t) * (z > 0)
    request = gc.pb.ComputeGradientsRequest()
    request.model.layers.add().linear.CopyFrom(gc.pb.Linear(in_features=4, out_features=2))
    request.model.layers.add().relu.SetInParent()
    request.model.loss.CopyFrom(gc.loss("mse"))
    request.parameters.add(weight=gc.to_tensor(w), bias=gc.to_tensor(b))
    request.inputs.CopyFrom(gc.to_tensor(x))
    request.targets.CopyFrom(gc.to_tensor(t))

    def call(method: str, **connect_args):
        """(status code, details, response) of one call on a new channel."""
        with gc.connect(args.target, **connect_args) as channel:
            service = gc.stub(channel)
            try:
                if method == "compute":
                    response = service.ComputeGradients(request, timeout=TIMEOUT)
                else:
                    response = service.GetServerInfo(gc.pb.GetServerInfoRequest(),
                                                      timeout=TIMEOUT)
                return grpc.StatusCode.OK, "", response
            except grpc.RpcError as error:
                return error.code(), error.details(), None

    def expect(code, what: str, method: str = "info", **connect_args):
        got, details, response = call(method, **connect_args)
        check(got == code,
              f"{what}: {code.name} (got {got.name}{': ' + details if details else ''})")
        return response

    print("mutual TLS + the right token")
    response = expect(grpc.StatusCode.OK, "token= ComputeGradients", "compute", token=token,
                      token_env=None, **mtls)
    if response is not None:
        (dw, db), = gc.gradients(response)
        for name, got, want in [("loss", response.loss, np.mean((np.maximum(z, 0) - t) ** 2)),
                                ("dW", dw, delta.T @ x), ("db", db, delta.sum(axis=0))]:
            # max|got - want| / max|want|, as python_generated_client.py.
            err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(float).tiny)
            check(err <= 1e-12, f"{name} matches the closed form: relative error {err:.1e}")
    expect(grpc.StatusCode.OK, "token_file= GetServerInfo", token_file=pem("token"),
           token_env=None, **mtls)
    os.environ["GRADSERVE_AUTH_TOKEN"] = token + "\n"  # As `export X=$(cat token)` might leave it.
    expect(grpc.StatusCode.OK, "$GRADSERVE_AUTH_TOKEN (default token_env) GetServerInfo", **mtls)
    os.environ["GRADSERVE_AUTH_TOKEN"] = "not-the-token"
    expect(grpc.StatusCode.OK, "token= wins over $GRADSERVE_AUTH_TOKEN", token=token, **mtls)
    expect(grpc.StatusCode.UNAUTHENTICATED, "a wrong $GRADSERVE_AUTH_TOKEN is what is sent", **mtls)
    del os.environ["GRADSERVE_AUTH_TOKEN"]
    expect(grpc.StatusCode.OK, "server_name_override='localhost'", token=token,
           server_name_override="localhost", **mtls)

    print("the token is required")
    for method in ("compute", "info"):
        code, details, _ = call(method, token_env=None, **mtls)
        check(code == grpc.StatusCode.UNAUTHENTICATED and
              details == "missing or invalid bearer token",
              f"no token, {method}: UNAUTHENTICATED 'missing or invalid bearer token' "
              f"(got {code.name}: {details})")
        expect(grpc.StatusCode.UNAUTHENTICATED, f"wrong token, {method}", method,
               token=token[:-1] + ("0" if token[-1] != "0" else "1"), **mtls)
        expect(grpc.StatusCode.UNAUTHENTICATED, f"token with a suffix, {method}", method,
               token=token + "x", **mtls)

    print("health needs no token")
    with gc.connect(args.target, token_env=None, **mtls) as channel:
        for name in ("", SERVICE):
            try:
                status = gc.health(channel, name, timeout=TIMEOUT)
            except grpc.RpcError as error:
                status = f"{error.code().name}: {error.details()}"
            check(status == "SERVING", f"health({name!r}) without a token: SERVING (got {status})")

    # Transport failures end the handshake, so the call never reaches the token check: each of
    # these carries the right token, and still must fail.
    print("the transport is enforced")
    expect(grpc.StatusCode.UNAVAILABLE, "TLS without a client certificate", token=token,
           root_ca_file=pem("ca.pem"))
    expect(grpc.StatusCode.UNAVAILABLE, "a client certificate from an untrusted CA", token=token,
           root_ca_file=pem("ca.pem"), cert_file=pem("other-client.pem"),
           key_file=pem("other-client.key"))
    expect(grpc.StatusCode.UNAVAILABLE, "plaintext", token=token)
    expect(grpc.StatusCode.UNAVAILABLE, "trusting another CA", token=token,
           root_ca_file=pem("other-ca.pem"), cert_file=pem("client.pem"),
           key_file=pem("client.key"))
    expect(grpc.StatusCode.UNAVAILABLE, "server_name_override to a name the certificate lacks",
           token=token, server_name_override="elsewhere.example", **mtls)

    print("bad options are refused before any call")
    (pki / "empty-token").write_text("\n")
    (pki / "spaced-token").write_text("two words\n")
    for what, kwargs, needle in [
        ("cert_file without key_file",
         dict(root_ca_file=pem("ca.pem"), cert_file=pem("client.pem")), "cert_file and key_file"),
        ("an unreadable CA file", dict(root_ca_file=pem("missing-ca.pem")), "missing-ca.pem"),
        ("token and token_file", dict(token=token, token_file=pem("token")), "not both"),
        ("an empty token file", dict(token_file=pem("empty-token")), "is empty"),
        ("a token with a space", dict(token_file=pem("spaced-token")), "visible ASCII"),
    ]:
        try:
            gc.connect(args.target, **kwargs).close()
            check(False, f"{what}: ValueError (connect succeeded)")
        except ValueError as error:
            check(needle in str(error), f"{what}: ValueError naming {needle!r} ({error})")

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        return 1
    print("PASS: the Python client's TLS, mutual TLS and token options work against the server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
