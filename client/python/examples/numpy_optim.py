"""SGD with momentum and Adam in numpy, with torch.optim's update formulas, for the examples that
keep the optimizer on the client (train_digits.py, vanishing_gradients.py).

Parameters and gradients are ``{state_dict key: array}``; the state lives in each parameter's
own dtype, as torch keeps it, so a float32 run rounds where torch's would. Hyperparameters are
Python floats: numpy (1.24, Debian 12) does not widen a float32 array multiplied by one.
Checked against torch 1.13 on random gradients for 20 steps: equal to rounding (float64 within
4e-15 relative; float32 within one ulp, as torch's kernels fuse the multiply-add).
"""

from typing import Dict, Mapping

import numpy as np


class SGD:
    """torch.optim.SGD(momentum=m, dampening=0, nesterov=False, weight_decay=0):
    buf = g on the first step, then buf = m * buf + g; p -= lr * buf."""

    def __init__(self, lr: float, momentum: float = 0.9):
        self.lr, self.momentum = float(lr), float(momentum)
        self.buffers: Dict[str, np.ndarray] = {}

    def step(self, params: Dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        for key, grad in grads.items():
            buf = self.buffers.get(key)
            if buf is None or self.momentum == 0.0:
                buf = grad.copy()
            else:
                buf = buf * self.momentum + grad
            self.buffers[key] = buf
            params[key] = params[key] - self.lr * buf


class Adam:
    """torch.optim.Adam(betas=(b1, b2), eps, weight_decay=0, amsgrad=False), its single-tensor
    formulas: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; with t the step count,
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.eps = float(lr), float(eps)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.t = 0
        self.m: Dict[str, np.ndarray] = {}
        self.v: Dict[str, np.ndarray] = {}

    def step(self, params: Dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        step_size = self.lr / (1.0 - self.beta1 ** self.t)
        correction2_sqrt = (1.0 - self.beta2 ** self.t) ** 0.5
        for key, grad in grads.items():
            m = self.m.get(key, np.zeros_like(grad)) * self.beta1 + (1.0 - self.beta1) * grad
            v = (self.v.get(key, np.zeros_like(grad)) * self.beta2
                 + (1.0 - self.beta2) * (grad * grad))
            self.m[key], self.v[key] = m, v
            params[key] = params[key] - step_size * (m / (np.sqrt(v) / correction2_sqrt + self.eps))


def make(name: str, lr: float):
    if name == "sgd":
        return SGD(lr, momentum=0.9)
    if name == "adam":
        return Adam(lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd or adam)")
