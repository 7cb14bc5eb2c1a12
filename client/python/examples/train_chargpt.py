#!/usr/bin/python3
"""Trains a character-level GPT on a text file through StreamGradients, with Adam on the client.

    client/python/generate.sh      # or use a venv with the package installed (README)
    PYTHONPATH=client/python /usr/bin/python3 client/python/examples/train_chargpt.py --target 127.0.0.1:50051

The text defaults to /usr/share/common-licenses/GPL-3 (Debian's base-files ships it; 35 kB, 76
distinct characters), split 90/10 into training and held-out text. The model is
client/python/torch_models.GPT (nanoGPT's layout: token + position embeddings, pre-norm blocks
of causal self-attention and a GELU MLP, LM head tied to the token embedding), 2 blocks,
4 heads, d = 64, context 64; gradserve.graph traces it once into a graph model (torch.fx), and
from then on torch is not used: each step sends a batch of [32, 64] token ids with its targets
and the previous step's Adam update on one stream, and the server answers with the loss and
the gradients by state_dict name. Adam (with global gradient-norm clipping at 1.0) runs here in
numpy, and this side applies each update to its own float32 copy exactly as the server does
(p = p + u, rounded once in float32), so the two stay bit-identical. Every --eval-every steps a
held-out batch goes through the same stream without an update, for its loss only.

Prints the loss, from ln(76) = 4.33 at the start to about 1.8 on training batches and 2.4 on
held-out ones after the default 300 steps (the text is small: the model starts to memorise it);
then, if torch is there, 300 characters sampled from the trained weights loaded back into the
torch module (the state_dict mapping's other direction). README: "Training a character-level
GPT". --unary makes one ComputeGradients call per step, with the full parameters, instead.

Needs only numpy and grpcio to train from a prebuilt graph: --save-model FILE writes the traced
model, the initial parameters and the vocabulary (one .npz); --load-model FILE trains from it
without importing torch.
"""

import argparse
import importlib.util
import math
import sys
import time

import numpy as np

from gradserve import client as gc
from gradserve.client import pb


def load_text(path: str):
    with open(path, encoding="utf-8") as file:
        text = file.read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = np.array([index[c] for c in text], dtype=np.int64)
    return text, vocab, data


def build(vocab_size: int, args):
    """The torch module, traced: (GraphModel, {name: float32 array} initial parameters,
    the module)."""
    import torch

    from gradserve import graph as gg
    import torch_models

    torch.manual_seed(args.seed)
    module = torch_models.GPT(vocab_size=vocab_size, block_size=args.context,
                              n_layer=args.layers, n_head=args.heads, n_embd=args.d).eval()
    example = np.zeros((args.batch, args.context), dtype=np.int64)
    model = gg.from_module(module, example, loss="cross_entropy")
    return model, model.parameter_arrays(module, np.float32), module


def save_model(path: str, model, params, vocab, shape) -> None:
    np.savez(path, model=np.frombuffer(model.model.SerializeToString(), dtype=np.uint8),
             shape=np.array(shape),
             vocab=np.array(["".join(vocab)]), aliases=np.array(
                 [f"{k}\t{v}" for k, v in model.aliases.items()]),
             **{f"param:{k}": v for k, v in params.items()})


def load_model(path: str):
    """(pb.Model, params, vocab, aliases, [batch, context]) from --save-model's file; numpy
    only. The graph is traced for one batch shape, which the file records."""
    with np.load(path) as z:
        model = pb.Model.FromString(z["model"].tobytes())
        params = {k[len("param:"):]: z[k] for k in z.files if k.startswith("param:")}
        vocab = list(str(z["vocab"][0]))
        aliases = dict(line.split("\t") for line in z["aliases"])
        shape = tuple(int(s) for s in z["shape"])
    return model, params, vocab, aliases, shape


class Adam:
    """torch.optim.Adam's update (no weight decay), in float64, as float32 steps."""

    def __init__(self, params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8):
        self.lr, (self.b1, self.b2), self.eps, self.t = lr, betas, eps, 0
        self.m = {k: np.zeros(v.shape) for k, v in params.items()}
        self.v = {k: np.zeros(v.shape) for k, v in params.items()}

    def update(self, grads, lr):
        self.t += 1
        out = {}
        for k, g in grads.items():
            g = g.astype(np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1 ** self.t)
            v_hat = self.v[k] / (1 - self.b2 ** self.t)
            out[k] = (-lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(np.float32)
        return out


class Trainer:
    """One training step at a time: on a StreamGradients stream (full parameters once, then
    each step's pending update, which the server adds to what it holds), or with --unary one
    ComputeGradients call per step carrying the full parameters. The two give the same bits:
    this side applies each update exactly as the server does."""

    def __init__(self, channel, model, unary: bool):
        self.model = model
        self.stub = gc.stub(channel) if unary else None
        self.stream = None if unary else gc.TrainingStream(channel, model, np.float32,
                                                           timeout=3600)
        self.first = True

    def step(self, x, y, params, update):
        """The ComputeGradientsResponse for batch (x, y) at ``params`` (which already include
        ``update``, the step the server has not been sent yet)."""
        inputs = {"idx": x, "targets": y}
        if self.stream is None:
            request = pb.ComputeGradientsRequest(model=self.model)
            request.named_parameters.extend(gc.named_tensors(params, np.float32))
            request.graph_inputs.extend(gc.named_tensors(inputs))
            return self.stub.ComputeGradients(request, timeout=600)
        if self.first:
            self.first = False
            return self.stream.step(graph_inputs=inputs, parameters=params).result
        return self.stream.step(graph_inputs=inputs, update=update).result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.__exit__(*exc)


def batch(data, rng, batch_size, context):
    starts = rng.integers(0, len(data) - context - 1, batch_size)
    x = np.stack([data[s:s + context] for s in starts])
    y = np.stack([data[s + 1:s + context + 1] for s in starts])
    return x, y


def sample(module, params, aliases, vocab, prompt, n, seed):
    """n characters from the trained weights, put back into the torch module by state_dict
    key (the tied LM head and token embedding get the same tensor)."""
    import torch

    state = module.state_dict()
    for key, name in aliases.items():
        state[key] = torch.from_numpy(params[name].copy())
    module.load_state_dict(state)
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in prompt if c in index] or [0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            context = torch.tensor([ids[-module.block_size:]])
            logits = module(context)[0, -1]
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1,
                                             generator=generator)))
    return "".join(vocab[i] for i in ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20, help="steps of linear lr warm-up")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=300,
                        help="characters to sample at the end (needs torch; 0: none)")
    parser.add_argument("--unary", action="store_true",
                        help="one ComputeGradients call per step with the full parameters "
                        "instead of a stream (same results, bit for bit)")
    parser.add_argument("--save-model", help="write the traced model, initial parameters and "
                        "vocabulary to this .npz and exit")
    parser.add_argument("--load-model", help="train the model of --save-model's file "
                        "(numpy and grpcio only)")
    args = parser.parse_args()

    text, vocab, data = load_text(args.text)
    module = None
    if args.load_model:
        model_proto, params, saved_vocab, aliases, (batch_size, context) = \
            load_model(args.load_model)
        if saved_vocab != vocab:
            print("the saved model's vocabulary differs from the text's", file=sys.stderr)
            return 2
    else:
        model, params, module = build(len(vocab), args)
        model_proto, aliases = model.model, model.aliases
        if args.save_model:
            save_model(args.save_model, model, params, vocab, (args.batch, args.context))
            print(f"wrote {args.save_model}: {len(model.graph.nodes)} nodes, "
                  f"{sum(v.size for v in params.values())} parameters")
            return 0
        batch_size, context = args.batch, args.context
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    n_params = sum(v.size for v in params.values())
    print(f"{args.text}: {len(text)} characters, vocabulary {len(vocab)} "
          f"(ln {len(vocab)} = {math.log(len(vocab)):.3f}); model: "
          f"{len(model_proto.graph.nodes)} graph nodes, {n_params} parameters; "
          f"batch {batch_size} x {context} tokens")

    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1)
    adam = Adam(params, lr=args.lr)
    channel = gc.connect(args.target)
    started = time.monotonic()
    with Trainer(channel, model_proto, unary=args.unary) as trainer:
        pending = None  # the update not sent yet (the server adds it on the next step)
        for step in range(args.steps + 1):
            if step % args.eval_every == 0 or step == args.steps:
                # A held-out batch for its loss only: nothing is computed from its gradients.
                x, y = batch(held_out, eval_rng, batch_size, context)
                result = trainer.step(x, y, params, pending)
                pending = None
                print(f"step {step:4d}  held-out loss {result.loss:.4f}  "
                      f"({time.monotonic() - started:.1f} s)")
                if step == args.steps:
                    break
            x, y = batch(train, rng, batch_size, context)
            result = trainer.step(x, y, params, pending)
            grads = gc.named_arrays(result.named_gradients)
            norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2))
                                 for g in grads.values()))
            if args.clip > 0 and norm > args.clip:
                grads = {k: g * (args.clip / norm) for k, g in grads.items()}
            lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
            pending = adam.update(grads, lr)
            params = {k: params[k] + pending[k] for k in params}  # as the server adds it
            if step % args.print_every == 0:
                print(f"step {step:4d}  loss {result.loss:.4f}  |grad| {norm:.3f}  "
                      f"lr {lr:.1e}")
    elapsed = time.monotonic() - started
    print(f"{args.steps} steps in {elapsed:.1f} s ({1e3 * elapsed / max(1, args.steps):.0f} ms "
          "a step, held-out batches included)")

    if args.sample > 0:
        if importlib.util.find_spec("torch") is None:
            return 0
        if module is None:
            _, _, module = build(len(vocab), args)
        print("sample:\n" + sample(module, params, aliases, vocab, "This License ", args.sample,
                                   args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
