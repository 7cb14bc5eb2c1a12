#!/usr/bin/env node
'use strict';
// One fixed ComputeGradients request, in float64 and in float32, with the answer's raw bytes as
// hex: the Node side of the cross-language test (Python, Node and C++ clients must print the
// same file for the same server).
//
//   node bin/gradients-hex.js --target 127.0.0.1:50051 [--out node.txt]
//
// The request, to reproduce in another language:
//   model: Linear(4, 8), Tanh, Linear(8, 8), ReLU, Linear(8, 3) (all with bias), MSELoss,
//          REDUCTION_MEAN; options.return_input_gradient = true; batch 5.
//   Every tensor is filled, in row-major element order i = 0, 1, ..., from its salt s:
//       value(s, i) = ((37 * i + 11 * s) mod 101) / 50 - 1
//   with the integer part exact, then ONE float64 division and ONE float64 subtraction (both
//   correctly rounded, so every IEEE language gets the same double); float32 tensors round
//   that double once to float32 (numpy .astype('<f4'), static_cast<float>, Math.fround).
//   Salts: inputs [5, 4] s = 0; targets [5, 3] s = 1; Linear layer k (k = 0, 1, 2):
//   weight [out, in] s = 2 + 2k, bias [out] s = 3 + 2k.
//
// Output: one line per value, fields separated by one space, lines ending in '\n':
//   <case> <name> <dtype> <shape> <hex>
//   case   float64 or float32 (the request's dtype), float64 first
//   name   loss, then gradients[k].weight and gradients[k].bias for k = 0, 1, 2, then
//          input_gradient
//   dtype  the Tensor's dtype name (DTYPE_FLOAT64 for the loss, a double in every case)
//   shape  dimensions joined by 'x' ('8x4'); the loss has shape '1'
//   hex    the Tensor's data bytes as sent (little-endian), lowercase hex; for the loss the 8
//          bytes of the float64, little-endian
const fs = require('node:fs');
const path = require('node:path');
const gs = require(path.join(__dirname, '..'));

const LAYERS = [[4, 8], [8, 8], [8, 3]];
const BATCH = 5;

function value(salt, i) {
  return ((37 * i + 11 * salt) % 101) / 50 - 1;
}

function filled(dtype, salt, count) {
  const out = dtype === 'float64' ? new Float64Array(count) : new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = value(salt, i);  // a Float32Array store rounds once
  return out;
}

// The request for dtype 'float64' or 'float32'.
function crossLanguageRequest(dtype) {
  const model = new gs.ModelBuilder()
      .linear(4, 8).tanh().linear(8, 8).relu().linear(8, 3).mse('mean').build();
  const parameters = LAYERS.map(([inF, outF], k) => gs.linearParameters(
      filled(dtype, 2 + 2 * k, outF * inF), [outF, inF], filled(dtype, 3 + 2 * k, outF)));
  return {
    model,
    parameters,
    inputs: gs.toTensor(filled(dtype, 0, BATCH * 4), [BATCH, 4]),
    targets: gs.toTensor(filled(dtype, 1, BATCH * 3), [BATCH, 3]),
    options: {return_input_gradient: true},
  };
}

function line(kase, name, tensor) {
  return `${kase} ${name} ${tensor.dtype} ${tensor.shape.join('x')} ${
    Buffer.from(tensor.data).toString('hex')}\n`;
}

// The text above for one response per case.
function format(responses) {
  let text = '';
  for (const [kase, response] of responses) {
    const loss = Buffer.alloc(8);
    loss.writeDoubleLE(response.loss);
    text += line(kase, 'loss', {dtype: 'DTYPE_FLOAT64', shape: [1], data: loss});
    response.gradients.forEach((g, k) => {
      text += line(kase, `gradients[${k}].weight`, g.weight);
      text += line(kase, `gradients[${k}].bias`, g.bias);
    });
    text += line(kase, 'input_gradient', response.input_gradient);
  }
  return text;
}

async function main(argv) {
  const args = {target: '127.0.0.1:50051', out: null};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--target') args.target = argv[++i];
    else if (argv[i] === '--out') args.out = argv[++i];
    else throw new Error(`unknown argument ${argv[i]} (--target HOST:PORT, --out FILE)`);
  }
  const client = gs.connect(args.target);
  try {
    const responses = [];
    for (const dtype of ['float64', 'float32']) {
      responses.push([dtype, await client.computeGradients(crossLanguageRequest(dtype))]);
    }
    const text = format(responses);
    if (args.out) fs.writeFileSync(args.out, text);
    else process.stdout.write(text);
  } finally {
    client.close();
  }
}

module.exports = {crossLanguageRequest, value, format, LAYERS, BATCH};

if (require.main === module) {
  main(process.argv.slice(2)).catch((error) => {
    console.error(`gradients-hex: ${error.message}`);
    process.exit(1);
  });
}
