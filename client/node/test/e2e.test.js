'use strict';
// The client against a real gradserve: GRADSERVE_BINARY names the binary (CTest passes the one
// it built; by hand: GRADSERVE_BINARY=build/release/server/gradserve node --test test/). Without
// it this file fails: an end-to-end test that quietly skips proves nothing.
const test = require('node:test');
const assert = require('node:assert/strict');
const {spawn, execFile} = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const gs = require('..');
const hex = require('../bin/gradients-hex.js');

const BINARY = process.env.GRADSERVE_BINARY;
const PACKAGE_DIR = path.resolve(__dirname, '..');

// Starts gradserve on a free loopback port: port 0, read back from its "listening on ...
// (port N)" line (tests/e2e/server_lib.sh does the same), so parallel CTest runs never collide.
function startServer(extraArgs = []) {
  if (!BINARY || !fs.existsSync(BINARY)) {
    throw new Error(`set GRADSERVE_BINARY to a gradserve binary (got ${JSON.stringify(BINARY)})`);
  }
  const proc = spawn(BINARY, ['--listen', '127.0.0.1:0', '--shutdown-grace', '5', '--threads',
    '1', ...extraArgs], {stdio: ['ignore', 'pipe', 'pipe']});
  let log = '';
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({code, signal})));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`gradserve did not report its port within 10 s:\n${log}`));
    }, 10000);
    const onData = (chunk) => {
      log += chunk;
      const match = /listening on .*\(port (\d+)\)/.exec(log);
      if (match) {
        clearTimeout(timer);
        resolve({proc, exited, target: `127.0.0.1:${match[1]}`, log: () => log});
      }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    exited.then(({code, signal}) => {
      clearTimeout(timer);
      reject(new Error(`gradserve exited during start-up (${code ?? signal}):\n${log}`));
    });
  });
}

let server;
let client;
let started = null;

// One server for the file, started by the first test that needs it. Not test.before: Node 18's
// runner (Debian 12 ships 18.13) does not run hooks registered at the top level of a file.
function ready() {
  if (!started) {
    started = startServer().then((s) => {
      server = s;
      client = gs.connect(server.target, {tokenEnv: null});
    });
  }
  return started;
}

// Only reached with a live server after a failure: the last test stops it cleanly.
process.on('exit', () => {
  if (server && server.proc.exitCode === null && server.proc.signalCode === null) {
    server.proc.kill('SIGKILL');
  }
});

// --- An independent float64 computation of the cross-language request ---------------------------

function decoded(tensor) {
  return gs.fromTensor(tensor).data;
}

// x [B, in] times W^T [in, out] plus b.
function linearForward(x, batch, w, b, inF, outF) {
  const y = new Float64Array(batch * outF);
  for (let r = 0; r < batch; r++) {
    for (let o = 0; o < outF; o++) {
      let s = b[o];
      for (let i = 0; i < inF; i++) s += x[r * inF + i] * w[o * inF + i];
      y[r * outF + o] = s;
    }
  }
  return y;
}

// Linear(4,8) Tanh Linear(8,8) ReLU Linear(8,3), MSE mean, by hand: the loss, each layer's
// (dW, db) and dL/dx.
function referenceGradients(request) {
  const batch = hex.BATCH;
  const params = request.parameters.map((p) => ({w: decoded(p.weight), b: decoded(p.bias)}));
  const x = decoded(request.inputs);
  const y = decoded(request.targets);
  const [[in0, out0], [in1, out1], [in2, out2]] = hex.LAYERS;
  const h0 = linearForward(x, batch, params[0].w, params[0].b, in0, out0);
  const a0 = h0.map(Math.tanh);
  const h1 = linearForward(a0, batch, params[1].w, params[1].b, in1, out1);
  const a1 = h1.map((v) => (v > 0 ? v : 0));
  const out = linearForward(a1, batch, params[2].w, params[2].b, in2, out2);
  let loss = 0;
  const dOut = new Float64Array(out.length);
  for (let i = 0; i < out.length; i++) {
    const d = out[i] - y[i];
    loss += d * d;
    dOut[i] = 2 * d / out.length;
  }
  loss /= out.length;
  const backward = (dY, xIn, w, inF, outF) => {
    const dW = new Float64Array(outF * inF);
    const db = new Float64Array(outF);
    const dX = new Float64Array(batch * inF);
    for (let r = 0; r < batch; r++) {
      for (let o = 0; o < outF; o++) {
        const g = dY[r * outF + o];
        db[o] += g;
        for (let i = 0; i < inF; i++) {
          dW[o * inF + i] += g * xIn[r * inF + i];
          dX[r * inF + i] += g * w[o * inF + i];
        }
      }
    }
    return {dW, db, dX};
  };
  const g2 = backward(dOut, a1, params[2].w, in2, out2);
  const dH1 = g2.dX.map((v, i) => (h1[i] > 0 ? v : 0));
  const g1 = backward(dH1, a0, params[1].w, in1, out1);
  const dH0 = g1.dX.map((v, i) => v * (1 - a0[i] * a0[i]));
  const g0 = backward(dH0, x, params[0].w, in0, out0);
  return {loss, layers: [g0, g1, g2], dX: g0.dX};
}

function assertClose(actual, expected, what, rtol = 1e-12) {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const scale = Math.max(1e-300, ...Array.from(expected, Math.abs));
  for (let i = 0; i < expected.length; i++) {
    const error = Math.abs(actual[i] - expected[i]) / scale;
    assert.ok(error <= rtol, `${what}[${i}]: server ${actual[i]}, reference ${expected[i]} ` +
                             `(error ${error.toExponential(2)} of the largest entry)`);
  }
}

test('float64 gradients match an independent computation to 1e-12', async () => {
  await ready();
  const request = hex.crossLanguageRequest('float64');
  const response = await client.computeGradients(request, {timeoutMs: 10000});
  const ref = referenceGradients(request);
  assert.ok(Math.abs(response.loss - ref.loss) <= 1e-13 * ref.loss,
            `loss ${response.loss} vs ${ref.loss}`);
  assert.equal(response.gradients.length, 3);
  gs.gradients(response).forEach((g, k) => {
    assert.equal(g.weight.dtype, 'DTYPE_FLOAT64');
    assert.deepEqual(g.weight.shape, [hex.LAYERS[k][1], hex.LAYERS[k][0]]);
    assertClose(g.weight.data, ref.layers[k].dW, `gradients[${k}].weight`);
    assertClose(g.bias.data, ref.layers[k].db, `gradients[${k}].bias`);
  });
  const dX = gs.fromTensor(response.input_gradient);
  assert.deepEqual(dX.shape, [hex.BATCH, 4]);
  assertClose(dX.data, ref.dX, 'input_gradient');
  // int64 fields arrive as exact decimal strings.
  assert.equal(response.stats.num_examples, String(hex.BATCH));
  assert.equal(response.diagnostics.length, 5);
  assert.equal(response.diagnostics[1].kind, 'tanh');
  assert.equal(response.diagnostics[0].non_finite_count, '0');
});

test('CheckGradients agrees with finite differences (float64, below 1e-6)', async () => {
  await ready();
  const answer = await client.checkGradients(
      {request: hex.crossLanguageRequest('float64'), samples_per_tensor: 8, seed: 2n ** 63n + 1n});
  assert.equal(answer.analytic_dtype, 'DTYPE_FLOAT64');
  assert.equal(answer.checks.length, 7);  // 3 weights, 3 biases, the inputs
  assert.ok(answer.max_rel_error < 1e-6, `max_rel_error ${answer.max_rel_error}`);
});

test('a bad request is rejected INVALID_ARGUMENT, by name, naming the field', async () => {
  await ready();
  const request = hex.crossLanguageRequest('float64');
  request.inputs = gs.toTensor(new Float64Array(15), [5, 3]);  // the first layer takes 4
  await assert.rejects(client.computeGradients(request), (error) => {
    assert.ok(error instanceof gs.GradserveError);
    assert.equal(error.code, gs.grpc.status.INVALID_ARGUMENT);
    assert.equal(error.codeName, 'INVALID_ARGUMENT');
    assert.match(error.message, /^ComputeGradients: INVALID_ARGUMENT: .*inputs/);
    return true;
  });
});

test('a deadline that has passed fails DEADLINE_EXCEEDED by name', async () => {
  await ready();
  await assert.rejects(client.getServerInfo({deadline: Date.now() - 1}),
                       {codeName: 'DEADLINE_EXCEEDED'});
});

test('server info, stats and health', async () => {
  await ready();
  const info = await client.getServerInfo();
  assert.equal(info.api, 'gradserve.v1');
  assert.equal(info.limits.max_message_bytes, String(gs.DEFAULT_MAX_MESSAGE_BYTES));
  assert.ok(info.dtypes.includes('DTYPE_FLOAT64'));
  const stats = await client.getStats();
  const compute = stats.methods.find((m) => m.method === 'ComputeGradients');
  const count = (code) => gs.toBigInt(compute.by_code.find((c) => c.code === code)?.calls ?? 0);
  assert.ok(count('OK') >= 1n, JSON.stringify(compute.by_code));
  assert.ok(count('INVALID_ARGUMENT') >= 1n, JSON.stringify(compute.by_code));
  assert.equal(await client.health(), 'SERVING');
  assert.equal(await gs.health(server.target, 'gradserve.v1.GradientService'), 'SERVING');
  assert.equal(await client.health('no.such.Service').catch((e) => e.codeName), 'NOT_FOUND');
});

test('answers above gRPC\'s 4 MiB default arrive; a 4 MiB client limit refuses them', async () => {
  await ready();
  // Linear(1024, 1) then Linear(1, 1024) on a [1024, 1024] float64 batch: 8 MiB of inputs
  // out, 8 MiB of output back (return_output).
  const n = 1024;
  const request = {
    model: new gs.ModelBuilder().linear(n, 1, {bias: false}).linear(1, n, {bias: false}).mse()
        .build(),
    parameters: [
      gs.linearParameters(new Float64Array(n).fill(1e-3), [1, n]),
      gs.linearParameters(new Float64Array(n).fill(1e-3), [n, 1]),
    ],
    inputs: gs.toTensor(new Float64Array(n * n).fill(1), [n, n]),
    targets: gs.toTensor(new Float64Array(n * n), [n, n]),
    options: {return_output: true},
  };
  const response = await client.computeGradients(request, {timeoutMs: 30000});
  assert.deepEqual(gs.fromTensor(response.output).shape, [n, n]);

  const small = gs.connect(server.target, {maxMessageBytes: 4 << 20, tokenEnv: null});
  try {
    await assert.rejects(small.computeGradients(request), {codeName: 'RESOURCE_EXHAUSTED'});
  } finally {
    small.close();
  }
});

function run(file, args, env = {}) {
  return new Promise((resolve) => {
    execFile(process.execPath, [file, ...args], {env: {...process.env, ...env}},
             (error, stdout, stderr) => resolve({code: error ? error.code : 0, stdout, stderr}));
  });
}

test('examples/compute.js runs against the server', async () => {
  await ready();
  const {code, stdout, stderr} = await run(path.join(PACKAGE_DIR, 'examples', 'compute.js'),
                                           ['--target', server.target]);
  assert.equal(code, 0, stderr);
  assert.match(stdout, /^loss \d+\.\d{6} .* on 32 examples$/m);
  assert.match(stdout, /layer 2: dW \[4,32\] norm /);
  assert.match(stdout, /^ +4 linear +head /m);
});

test('bin/gradients-hex.js prints the same bytes every time, and the loss computed above', async () => {
  await ready();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gradserve-node-'));
  try {
    const out = path.join(tmp, 'node.txt');
    const first = await run(path.join(PACKAGE_DIR, 'bin', 'gradients-hex.js'),
                            ['--target', server.target, '--out', out]);
    assert.equal(first.code, 0, first.stderr);
    const second = await run(path.join(PACKAGE_DIR, 'bin', 'gradients-hex.js'),
                             ['--target', server.target]);
    assert.equal(second.code, 0, second.stderr);
    const text = fs.readFileSync(out, 'utf8');
    assert.equal(second.stdout, text);
    const lines = text.trimEnd().split('\n').map((l) => l.split(' '));
    assert.equal(lines.length, 16);  // 2 cases x (loss, 3 x (weight, bias), input_gradient)
    assert.deepEqual(lines.map((l) => `${l[0]} ${l[1]}`).slice(0, 8), [
      'float64 loss', 'float64 gradients[0].weight', 'float64 gradients[0].bias',
      'float64 gradients[1].weight', 'float64 gradients[1].bias', 'float64 gradients[2].weight',
      'float64 gradients[2].bias', 'float64 input_gradient']);
    for (const [kase, name, dtype, shape, bytes] of lines) {
      const size = name === 'loss' || kase === 'float64' ? 8 : 4;
      assert.equal(bytes.length, 2 * size * shape.split('x').reduce((a, b) => a * b, 1),
                   `${kase} ${name} ${dtype} ${shape}`);
    }
    const ref = referenceGradients(hex.crossLanguageRequest('float64'));
    const loss64 = Buffer.from(lines[0][4], 'hex').readDoubleLE(0);
    assert.ok(Math.abs(loss64 - ref.loss) <= 1e-13 * ref.loss);
    // float32 rounds the data and the arithmetic: close to, but not the float64 loss.
    const loss32 = Buffer.from(lines[8][4], 'hex').readDoubleLE(0);
    assert.ok(loss32 !== loss64 && Math.abs(loss32 - loss64) < 1e-5 * loss64, `${loss32}`);
  } finally {
    fs.rmSync(tmp, {recursive: true, force: true});
  }
});

test('the documented data formula', () => {
  // value(s, i) = ((37 i + 11 s) mod 101) / 50 - 1: the numbers other languages reproduce.
  assert.equal(hex.value(0, 0), -1);
  assert.equal(hex.value(0, 3), 111 % 101 / 50 - 1);
  assert.equal(hex.value(2, 5), (185 + 22) % 101 / 50 - 1);
  const r = hex.crossLanguageRequest('float32');
  const w1 = gs.fromTensor(r.parameters[1].weight);
  assert.equal(w1.data[9], Math.fround(((37 * 9 + 11 * 4) % 101) / 50 - 1));
});

test('the bearer token: refused without it, sent from the option and from the environment',
     async () => {
       const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gradserve-node-'));
       const tokenFile = path.join(tmp, 'token');
       fs.writeFileSync(tokenFile, 'node-client-token\n');
       const guarded = await startServer(['--auth-token-file', tokenFile]);
       const clients = [];
       try {
         const without = gs.connect(guarded.target, {tokenEnv: null});
         const fromFile = gs.connect(guarded.target, {tokenFile});
         process.env.GRADSERVE_NODE_TEST_TOKEN = 'node-client-token';
         const fromEnv = gs.connect(guarded.target, {tokenEnv: 'GRADSERVE_NODE_TEST_TOKEN'});
         const wrong = gs.connect(guarded.target, {token: 'not-the-token'});
         clients.push(without, fromFile, fromEnv, wrong);
         await assert.rejects(without.getServerInfo(), {codeName: 'UNAUTHENTICATED'});
         // Health stays open, so load balancers need no token.
         assert.equal(await without.health(), 'SERVING');
         assert.equal((await fromFile.getServerInfo()).api, 'gradserve.v1');
         assert.equal((await fromEnv.getServerInfo()).api, 'gradserve.v1');
         await assert.rejects(wrong.getServerInfo(), {codeName: 'UNAUTHENTICATED'});
       } finally {
         delete process.env.GRADSERVE_NODE_TEST_TOKEN;
         for (const c of clients) c.close();
         guarded.proc.kill('SIGTERM');
         assert.deepEqual(await guarded.exited, {code: 0, signal: null});
         fs.rmSync(tmp, {recursive: true, force: true});
       }
     });

// Last: node:test runs the tests of a file in order.
test('the server exits 0 on SIGTERM', async () => {
  await ready();
  client.close();
  client = null;
  server.proc.kill('SIGTERM');
  const {code, signal} = await server.exited;
  assert.equal(signal, null, server.log());
  assert.equal(code, 0, server.log());
});
