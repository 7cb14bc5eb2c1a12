#!/usr/bin/env python3
"""Minimal gradserve client: server info, then one gradient step's worth of gradients.

    client/python/generate.sh
    /usr/bin/python3 client/python/example.py --target 127.0.0.1:50051
    /usr/bin/python3 client/python/example.py --target localhost:50051 --tls-ca ca.pem \
        --tls-cert client.pem --tls-key client.key --auth-token-file token

Needs only numpy and grpcio; the model is written out as protobuf messages rather than built
from torch, to show the API itself. The connection flags are gradclient's; without
--auth-token-file the token comes from $GRADSERVE_AUTH_TOKEN, if set.
"""

import argparse
import sys

import grpc
import numpy as np

import gradserve_client as gc
from gradserve_client import pb


def tiny_mlp_request(dtype=np.float32) -> "pb.ComputeGradientsRequest":
    """Linear(3 -> 5) -> GELU -> Linear(5 -> 2) -> cross-entropy, batch 4, seeded."""
    rng = np.random.default_rng(0)
    request = pb.ComputeGradientsRequest()
    layers = request.model.layers
    layers.add(name="fc1").linear.CopyFrom(pb.Linear(in_features=3, out_features=5))
    layers.add(name="act").gelu.SetInParent()
    layers.add(name="fc2").linear.CopyFrom(pb.Linear(in_features=5, out_features=2))
    request.model.loss.CopyFrom(gc.loss("cross_entropy", "mean"))
    # nn.Linear layout: weight [out, in], bias [out]; one parameters entry per Linear, in order.
    for fan_in, fan_out in ((3, 5), (5, 2)):
        bound = 1.0 / np.sqrt(fan_in)  # nn.Linear's default init range
        request.parameters.add(
            weight=gc.to_tensor(rng.uniform(-bound, bound, (fan_out, fan_in)), dtype),
            bias=gc.to_tensor(rng.uniform(-bound, bound, fan_out), dtype))
    request.inputs.CopyFrom(gc.to_tensor(rng.standard_normal((4, 3)), dtype))
    request.targets.CopyFrom(gc.to_tensor(np.array([0, 1, 1, 0], dtype=np.int64)))
    request.options.return_input_gradient = True
    return request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--tls", action="store_true",
                        help="TLS with the system's root CAs (implied by the --tls-* options)")
    parser.add_argument("--tls-ca", help="PEM CA certificates that signed the server's")
    parser.add_argument("--tls-cert", help="PEM client certificate chain, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name",
                        help="name to verify the server's certificate against instead of the "
                             "target's host")
    parser.add_argument("--auth-token-file",
                        help="file holding the bearer token (default: $GRADSERVE_AUTH_TOKEN)")
    args = parser.parse_args()

    try:
        channel = gc.connect(args.target, tls=args.tls, root_ca_file=args.tls_ca,
                             cert_file=args.tls_cert, key_file=args.tls_key,
                             server_name_override=args.tls_server_name,
                             token_file=args.auth_token_file)
    except ValueError as error:
        print(f"example.py: {error}", file=sys.stderr)
        return 2
    with channel:
        service = gc.stub(channel)
        try:
            info = service.GetServerInfo(pb.GetServerInfoRequest(), timeout=args.timeout)
            print(f"gradserve {info.version} ({info.api}): layers {list(info.layers)}, "
                  f"losses {list(info.losses)}, {info.threads} threads per call, "
                  f"max message {info.limits.max_message_bytes} bytes")
            response = service.ComputeGradients(tiny_mlp_request(), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"call failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1

    print(f"loss {response.loss:.6f}")
    for index, (dw, db) in enumerate(gc.gradients(response)):
        print(f"  parameters[{index}]: |dW| = {np.linalg.norm(dw):.6f}  "
              f"|db| = {np.linalg.norm(db):.6f}")
    print(f"  inputs: |dx| = {np.linalg.norm(gc.from_tensor(response.input_gradient)):.6f}")
    stats = response.stats
    print(f"forward {stats.forward_micros:.1f} us, backward {stats.backward_micros:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
