#!/usr/bin/python3
"""Minimal gradserve client: server info, then one gradient step's worth of gradients.

    client/python/generate.sh      # or use a venv with the package installed (README)
    PYTHONPATH=client/python /usr/bin/python3 client/python/examples/example.py --target 127.0.0.1:50051
    PYTHONPATH=client/python /usr/bin/python3 client/python/examples/example.py --target localhost:50051 --tls-ca ca.pem \
        --tls-cert client.pem --tls-key client.key --auth-token-file token

Needs only numpy and grpcio; the models are written out as protobuf messages rather than built
from torch, to show the API itself: a chain of layers, then the same kind of network as a graph
model with a residual connection and LayerNorm (gradserve.graph.GraphBuilder; from a torch
module, gradserve.graph.from_module writes such graphs itself). The connection flags are gradclient's; without
--auth-token-file the token comes from $GRADSERVE_AUTH_TOKEN, if set.
"""

import argparse
import sys

import grpc
import numpy as np

from gradserve import client as gc
from gradserve import graph as gg
from gradserve.client import pb


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


def tiny_graph_request(dtype=np.float32) -> "pb.ComputeGradientsRequest":
    """x + fc2(gelu(fc1(LayerNorm(x)))) -> head -> cross-entropy, batch 4, as a graph: ONNX
    op names, parameters named as a torch state_dict would name them."""
    b = gg.GraphBuilder()
    b.input("x", dtype)
    b.input("targets", np.int64)
    rng = np.random.default_rng(1)
    shapes = {"ln.weight": (3,), "ln.bias": (3,), "fc1.weight": (5, 3), "fc1.bias": (5,),
              "fc2.weight": (3, 5), "fc2.bias": (3,), "head.weight": (2, 3), "head.bias": (2,)}
    for name, shape in shapes.items():
        b.parameter(name, shape)
    h = b.node("LayerNormalization", ["x", "ln.weight", "ln.bias"], name="ln", epsilon=1e-5)
    h = b.node("Gemm", [h, "fc1.weight", "fc1.bias"], name="fc1", transB=1)  # nn.Linear layout
    h = b.node("Gelu", [h], name="act")
    h = b.node("Gemm", [h, "fc2.weight", "fc2.bias"], name="fc2", transB=1)
    h = b.node("Add", ["x", h], name="residual")
    y = b.node("Gemm", [h, "head.weight", "head.bias"], name="head", transB=1)
    request = pb.ComputeGradientsRequest(model=b.model(gc.loss("cross_entropy"), y, "targets"))
    params = {name: rng.uniform(-0.5, 0.5, shape) for name, shape in shapes.items()}
    params["ln.weight"] += 1.0
    request.named_parameters.extend(gc.named_tensors(params, dtype))
    request.graph_inputs.extend(gc.named_tensors(
        {"x": rng.standard_normal((4, 3)), "targets": np.array([0, 1, 1, 0])}, dtype))
    request.options.input_gradient_names.append("x")
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
                  f"losses {list(info.losses)}, {len(info.graph_ops)} graph ops, "
                  f"{info.threads} threads per call, "
                  f"max message {info.limits.max_message_bytes} bytes")
            response = service.ComputeGradients(tiny_mlp_request(), timeout=args.timeout)
            graph_response = service.ComputeGradients(tiny_graph_request(), timeout=args.timeout)
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

    print(f"graph model: loss {graph_response.loss:.6f}")
    for name, grad in gc.named_arrays(graph_response.named_gradients).items():
        print(f"  {name}: |grad| = {np.linalg.norm(grad):.6f}")
    for name, grad in gc.named_arrays(graph_response.input_gradients).items():
        print(f"  d{name}: |grad| = {np.linalg.norm(grad):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
