#!/usr/bin/python3
"""Acceptance check: gradserve-optimizer's update rules are torch.optim's, bit for bit.

    /usr/bin/python3 bench/optimizer_crosscheck.py --gradserve 127.0.0.1:PORT \
        --optimizer 127.0.0.1:PORT [--steps 25] [--seed 0]

Starts nothing: point it at a running gradserve and a gradserve-optimizer. For each optimizer
configuration (SGD plain, with momentum, dampening, Nesterov and weight decay; Adam with and
without weight decay, other betas and eps; AdamW), it creates a float64 MLP run on the
optimizer service (one replica, one part) and mirrors it in torch: before each step it asks
gradserve itself for the gradients at the parameters both sides hold (the same call, bit for
bit, that the optimizer service makes), gives torch those gradients, lets torch.optim step,
then steps the service on the same batch and compares every parameter bit for bit. What it
tests is the update rule alone, not autograd (bench/pytorch_crosscheck.py does that).
Prints one row per configuration and exits 1 if any parameter differs in any bit.
"""

import argparse
import sys
import uuid

import numpy as np
import torch

from gradserve import client as gc
from gradserve.optimizer.v1 import optimizer_pb2 as opb
from gradserve.optimizer.v1 import optimizer_pb2_grpc as opb_grpc

CONFIGS = [
    ("SGD", dict(lr=0.1), torch.optim.SGD, {}),
    ("SGD momentum", dict(lr=0.05, momentum=0.9), torch.optim.SGD, {}),
    ("SGD momentum+dampening+wd", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3),
     torch.optim.SGD, {}),
    ("SGD nesterov", dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD, {}),
    ("Adam", dict(lr=1e-2), torch.optim.Adam, {}),
    ("Adam wd, betas, eps", dict(lr=3e-3, weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
     torch.optim.Adam, {}),
    ("AdamW", dict(lr=1e-2), torch.optim.AdamW, {}),
    ("AdamW wd 0.1", dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW, {}),
]
ALGORITHM = {torch.optim.SGD: "ALGORITHM_SGD", torch.optim.Adam: "ALGORITHM_ADAM",
             torch.optim.AdamW: "ALGORITHM_ADAMW"}


def optimizer_config(cls, kwargs):
    config = opb.OptimizerConfig(algorithm=ALGORITHM[cls], lr=kwargs["lr"])
    for name in ("momentum", "dampening", "nesterov"):
        if name in kwargs:
            setattr(config, name, kwargs[name])
    if "weight_decay" in kwargs:
        config.weight_decay = kwargs["weight_decay"]
    if "betas" in kwargs:
        config.beta1, config.beta2 = kwargs["betas"]
    if "eps" in kwargs:
        config.eps = kwargs["eps"]
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--gradserve", required=True)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    grad_stub = gc.stub(gc.connect(args.gradserve))
    opt_stub = opb_grpc.OptimizerServiceStub(gc.connect(args.optimizer))
    failures = 0
    print(f"torch {torch.__version__}; {args.steps} steps each; float64 MLP 10-16-tanh-16-3, "
          "cross-entropy")
    for name, kwargs, cls, _ in CONFIGS:
        rng = np.random.default_rng(args.seed)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape) * 0.5))
        x0 = rng.standard_normal((32, 10))
        y0 = rng.integers(0, 3, 32)
        request = gc.request_from_sequential(model, "cross_entropy", x0, y0)
        run_id = "crosscheck-" + uuid.uuid4().hex[:8]
        spec = opb.RunSpec(run_id=run_id, model=request.model, dtype=gc.pb.DTYPE_FLOAT64,
                           optimizer=optimizer_config(cls, kwargs),
                           gradserve_targets=[args.gradserve], shards=1)
        spec.parameters.extend(request.parameters)
        opt_stub.CreateRun(opb.CreateRunRequest(spec=spec), timeout=30)
        torch_opt = cls(model.parameters(), **kwargs)
        differing = 0
        try:
            for step in range(args.steps):
                x = rng.standard_normal((32, 10))
                y = rng.integers(0, 3, 32)
                call = gc.request_from_sequential(model, "cross_entropy", x, y)
                answer = grad_stub.ComputeGradients(call, timeout=30)
                layers = [m for m in model if isinstance(m, torch.nn.Linear)]
                for layer, grads in zip(layers, answer.gradients):
                    layer.weight.grad = torch.from_numpy(gc.from_tensor(grads.weight).copy())
                    layer.bias.grad = torch.from_numpy(gc.from_tensor(grads.bias).copy())
                torch_opt.step()
                opt_stub.Step(opb.StepRequest(run_id=run_id, inputs=call.inputs,
                                              targets=call.targets, expected_step=step),
                              timeout=30)
                served = opt_stub.GetParameters(opb.GetParametersRequest(run_id=run_id),
                                                timeout=30)
                state = model.state_dict()
                for named in served.parameters:
                    key = str(int(named.name.split(".")[0])) + "." + named.name.split(".")[1]
                    mine = gc.from_tensor(named.tensor)
                    theirs = state[key].numpy()
                    differing += int(np.count_nonzero(mine.view(np.int64) !=
                                                      theirs.view(np.int64)))
                    # Keep both sides on the same bits so one difference is counted once.
                    with torch.no_grad():
                        state[key].copy_(torch.from_numpy(mine.copy()))
        finally:
            opt_stub.DeleteRun(opb.DeleteRunRequest(run_id=run_id), timeout=30)
        total = sum(p.numel() for p in model.parameters()) * args.steps
        verdict = "bit-identical" if differing == 0 else f"{differing} of {total} differ"
        print(f"  {name:28s} {verdict}")
        failures += differing > 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
