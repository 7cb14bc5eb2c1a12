#!/usr/bin/env node
'use strict';
// A complete ComputeGradients call: a 3-layer MLP classifying a batch of 32 examples into 4
// classes (cross-entropy, int64 class targets), in float32, then the loss, each gradient's shape
// and norm, and the server's per-layer diagnostics.
//
//   node examples/compute.js --target 127.0.0.1:50051 [--token-file FILE]
const path = require('node:path');
const gs = require(path.join(__dirname, '..'));  // require('gradserve') once installed

const [IN, HIDDEN, CLASSES, BATCH] = [16, 32, 4, 32];

function parseArgs(argv) {
  const args = {target: '127.0.0.1:50051'};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--target') args.target = argv[++i];
    else if (argv[i] === '--token-file') args.tokenFile = argv[++i];
    else throw new Error(`unknown argument ${argv[i]} (--target HOST:PORT, --token-file FILE)`);
  }
  return args;
}

// Reproducible without a random-number library: a small linear congruential generator.
function uniform(count, seed, scale) {
  const out = new Float32Array(count);
  let state = seed >>> 0;
  for (let i = 0; i < count; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    out[i] = (state / 2 ** 32 * 2 - 1) * scale;
  }
  return out;
}

function norm(array) {
  let sum = 0;
  for (const v of array) sum += v * v;
  return Math.sqrt(sum);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = gs.connect(args.target, {tokenFile: args.tokenFile});
  const model = new gs.ModelBuilder()
      .linear(IN, HIDDEN).named('fc1').relu()
      .linear(HIDDEN, HIDDEN).named('fc2').gelu()
      .linear(HIDDEN, CLASSES).named('head')
      .crossEntropy()
      .build();
  // nn.Linear's default initialisation range, U(-1/sqrt(in), 1/sqrt(in)).
  const layer = (inF, outF, seed) => gs.linearParameters(
      uniform(outF * inF, seed, 1 / Math.sqrt(inF)), [outF, inF],
      uniform(outF, seed + 1, 1 / Math.sqrt(inF)));
  // Class targets are int64 on the wire (PyTorch's torch.long): a BigInt64Array.
  const targets = BigInt64Array.from({length: BATCH}, (_, i) => BigInt(i % CLASSES));

  const response = await client.computeGradients({
    model,
    parameters: [layer(IN, HIDDEN, 1), layer(HIDDEN, HIDDEN, 3), layer(HIDDEN, CLASSES, 5)],
    inputs: gs.toTensor(uniform(BATCH * IN, 7, 1), [BATCH, IN]),
    targets: gs.toTensor(targets, [BATCH]),
  }, {timeoutMs: 10000});

  console.log(`loss ${response.loss.toFixed(6)} (ln ${CLASSES} = ${Math.log(CLASSES).toFixed(6)} ` +
              `at chance) on ${response.stats.num_examples} examples`);
  gs.gradients(response).forEach(({weight, bias}, k) => {
    console.log(`layer ${k}: dW [${weight.shape}] norm ${norm(weight.data).toExponential(4)}, ` +
                `db [${bias.shape}] norm ${norm(bias.data).toExponential(4)}`);
  });
  // The gradient norms are proto3 `optional`: absent (undefined here) when the server did not
  // compute that gradient, e.g. |dW| of a ReLU (Note [Diagnostics rule] in gradserve.proto).
  console.log('diagnostics (per layer: |dW|, |db|, |dL/d out|, |out|, non-finite; - not computed)');
  for (const d of response.diagnostics) {
    console.log(`  ${String(d.layer_index).padStart(2)} ${d.kind.padEnd(7)} ${d.name.padEnd(5)} ` +
                [d.weight_grad_norm, d.bias_grad_norm, d.output_grad_norm, d.activation_norm]
                    .map((v) => (v === undefined ? '-' : v.toExponential(3)).padStart(10))
                    .join(' ') +
                ` ${d.non_finite_count}`);
  }
  console.log(`forward ${response.stats.forward_micros.toFixed(0)} us, backward ` +
              `${response.stats.backward_micros.toFixed(0)} us, peak activations ` +
              `${response.stats.peak_activation_bytes} bytes`);
  client.close();
}

main().catch((error) => {
  // A GradserveError's message names the status ("ComputeGradients: UNAVAILABLE: ...").
  console.error(`compute.js: ${error.message}`);
  process.exit(1);
});
