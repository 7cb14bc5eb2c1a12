'use strict';
// The client's helpers without a server: tensors of every dtype through the real wire encoding,
// int64 beyond 2^53, malformed tensors, the model builder, where the .proto files are found, and
// connect's option checks.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const gs = require('..');

const Tensor = gs.messageType('Tensor');
// Through serialize/deserialize, exactly as a request and a response travel.
const wire = (tensor) => Tensor.deserialize(Tensor.serialize(tensor));

const CASES = [
  ['DTYPE_FLOAT32', Float32Array.of(1.5, -0, Math.fround(1e-40), Infinity, -3.25, NaN)],
  ['DTYPE_FLOAT64', Float64Array.of(Math.PI, -0, 5e-324, -Infinity, 1e308, NaN)],
  ['DTYPE_INT32', Int32Array.of(0, -1, 2147483647, -2147483648, 7, 42)],
  ['DTYPE_INT64', BigInt64Array.of(0n, -1n, 2n ** 63n - 1n, -(2n ** 63n), 2n ** 53n + 1n, 3n)],
  ['DTYPE_BOOL', Uint8Array.of(0, 1, 1, 0, 1, 0)],
];

function sameBits(a, b) {
  assert.equal(a.constructor, b.constructor);
  assert.deepEqual(Buffer.from(a.buffer, a.byteOffset, a.byteLength),
                   Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

for (const [dtype, values] of CASES) {
  test(`${dtype} round trip, bit for bit`, () => {
    const tensor = wire(gs.toTensor(values, [2, 3]));
    assert.equal(tensor.dtype, dtype);
    assert.deepEqual(tensor.shape, ['2', '3']);  // int64 arrives as decimal strings
    const back = gs.fromTensor(tensor);
    assert.equal(back.dtype, dtype);
    assert.deepEqual(back.shape, [2, 3]);
    sameBits(back.data, values);
  });

  test(`${dtype}: the byte-order-neutral path writes and reads the same bytes`, () => {
    const little = gs._encodeData(values, dtype, true);
    const neutral = gs._encodeData(values, dtype, false);
    assert.deepEqual(neutral, little);
    sameBits(gs._decodeData(neutral, dtype, false), values);
  });
}

test('the data is little-endian, row-major, without padding', () => {
  assert.equal(gs.toTensor(Float32Array.of(1, 2)).data.toString('hex'), '0000803f00000040');
  assert.equal(gs.toTensor(Float64Array.of(1)).data.toString('hex'), '000000000000f03f');
  assert.equal(gs.toTensor(Int32Array.of(-2)).data.toString('hex'), 'feffffff');
  assert.equal(gs.toTensor(BigInt64Array.of(2n ** 56n + 1n)).data.toString('hex'),
               '0100000000000001');
  // The bytes of element [i, j] of a [2, 3] float64 tensor start at 8 * (3i + j).
  const t = gs.toTensor(Float64Array.of(0, 1, 2, 3, 4, 5), [2, 3]);
  assert.equal(t.data.readDoubleLE(8 * (3 * 1 + 2)), 5);
  assert.equal(t.data.length, 48);
});

test('a view into a larger buffer encodes only its own elements', () => {
  const backing = new Float64Array([9, 1, 2, 9]);
  const view = backing.subarray(1, 3);
  sameBits(gs.fromTensor(wire(gs.toTensor(view))).data, Float64Array.of(1, 2));
});

test('unaligned response bytes decode (gRPC buffers are slices of a pool)', () => {
  const pool = Buffer.alloc(1 + 16);
  pool.writeDoubleLE(0.1, 1);
  pool.writeDoubleLE(-7, 9);
  const data = pool.subarray(1);  // byteOffset 1: no Float64Array view possible
  const out = gs.fromTensor({dtype: 'DTYPE_FLOAT64', shape: ['2'], data});
  sameBits(out.data, Float64Array.of(0.1, -7));
});

test('int64 values beyond 2^53 survive exactly', () => {
  const big = BigInt64Array.of(2n ** 53n + 1n, -(2n ** 62n) - 3n, 9007199254740993n);
  const back = gs.fromTensor(wire(gs.toTensor(big)));
  assert.deepEqual([...back.data], [...big]);
  // As a double, 2^53 + 1 would have become 2^53: the test above would have caught that.
  assert.notEqual(BigInt(Number(2n ** 53n + 1n)), 2n ** 53n + 1n);
});

test('uint64/int64 request fields keep every bit: BigInt, string and number in, string out', () => {
  const Options = gs.messageType('ComputeOptions');
  for (const seed of [2n ** 64n - 1n, 2n ** 53n + 1n, '18446744073709551615', 12]) {
    const out = Options.deserialize(Options.serialize({dropout_seed: seed}));
    assert.equal(out.dropout_seed, String(seed));
  }
  const Check = gs.messageType('CheckGradientsRequest');
  assert.equal(Check.deserialize(Check.serialize({seed: 2n ** 63n + 7n})).seed,
               (2n ** 63n + 7n).toString());
});

test('toBigInt and toSafeNumber', () => {
  assert.equal(gs.toBigInt('9007199254740993'), 9007199254740993n);
  assert.equal(gs.toBigInt(-5), -5n);
  assert.equal(gs.toSafeNumber('9007199254740991'), 9007199254740991);
  assert.throws(() => gs.toSafeNumber('9007199254740993'), /beyond 2\^53/);
  assert.throws(() => gs.toBigInt('1.5'), TypeError);
  assert.throws(() => gs.toBigInt(1.5), RangeError);
});

test('a shape beyond 2^53 is refused rather than rounded', () => {
  assert.throws(() => gs.fromTensor({dtype: 'DTYPE_FLOAT32', shape: ['9007199254740993'],
                                     data: Buffer.alloc(0)}),
                /beyond 2\^53/);
});

test('byte lengths that do not match the shape are rejected with the numbers', () => {
  assert.throws(
      () => gs.fromTensor({dtype: 'DTYPE_FLOAT64', shape: ['2', '3'], data: Buffer.alloc(47)}),
      {name: 'RangeError', message: /shape \[2,3\] and DTYPE_FLOAT64 needs 48 bytes, has 47/});
  assert.throws(
      () => gs.fromTensor({dtype: 'DTYPE_INT32', shape: ['4'], data: Buffer.alloc(20)}),
      /needs 16 bytes, has 20/);
  assert.throws(() => gs.fromTensor({dtype: 'DTYPE_UNSPECIFIED', shape: [], data: Buffer.alloc(0)}),
                /unsupported dtype DTYPE_UNSPECIFIED/);
  assert.throws(() => gs.fromTensor(null), /no tensor/);
  assert.throws(() => gs.toTensor(new Float32Array(6), [4, 2]),
                /shape \[4,2\] holds 8 elements, the array has 6/);
  assert.throws(() => gs.toTensor([1, 2, 3]), /Float32Array/);
  assert.throws(() => gs.toTensor(new Float32Array(1), [1], 'float16'), /unknown dtype/);
});

test('toTensor converts on request, and keeps a typed array\'s own dtype otherwise', () => {
  const t = gs.toTensor([0.1, 2], [2], 'float32');
  assert.equal(t.dtype, 'DTYPE_FLOAT32');
  sameBits(gs.fromTensor(t).data, Float32Array.of(0.1, 2));
  const ids = gs.toTensor([3, 2n ** 60n], undefined, 'int64');
  assert.deepEqual([...gs.fromTensor(ids).data], [3n, 2n ** 60n]);
  assert.throws(() => gs.toTensor(Float64Array.of(0.5), [1], 'int64'), /not an integer/);
  assert.equal(gs.toTensor(Float64Array.of(1)).dtype, 'DTYPE_FLOAT64');  // never narrowed
});

test('named tensors: scalars, bool masks and arrays by name', () => {
  const named = gs.namedTensors({
    'ln.weight': Float32Array.of(1, 2),
    'scale': {data: [0.5], shape: [], dtype: 'float32'},
    'mask': {data: Uint8Array.of(1, 0, 0, 1), shape: [2, 2]},
    'ids': gs.toTensor(BigInt64Array.of(4n)),
  });
  const NamedTensor = gs.messageType('NamedTensor');
  const back = gs.namedArrays(named.map((n) => NamedTensor.deserialize(NamedTensor.serialize(n))));
  assert.deepEqual(Object.keys(back), ['ln.weight', 'scale', 'mask', 'ids']);
  assert.deepEqual(back.scale.shape, []);
  assert.deepEqual([...back.scale.data], [0.5]);
  assert.equal(back.mask.dtype, 'DTYPE_BOOL');
  assert.deepEqual([...back.mask.data], [1, 0, 0, 1]);
  assert.deepEqual([...back.ids.data], [4n]);
});

test('ModelBuilder builds the Model message the C++ builder does', () => {
  const model = new gs.ModelBuilder()
      .linear(4, 8).named('fc1').leakyRelu(0.2).linear(8, 2, {bias: false}).gelu({tanh: true})
      .sigmoid().tanh().identity().relu().huber(0.5, 'sum').build();
  const Model = gs.messageType('Model');
  const back = Model.deserialize(Model.serialize(model));
  assert.deepEqual(back.layers.map((l) => l.kind),
                   ['linear', 'leaky_relu', 'linear', 'gelu', 'sigmoid', 'tanh', 'identity',
                    'relu']);
  assert.equal(back.layers[0].name, 'fc1');
  assert.equal(back.layers[0].linear.in_features, '4');
  assert.equal(back.layers[1].leaky_relu.negative_slope, 0.2);
  assert.equal(back.layers[2].linear.bias, false);
  assert.equal(back.layers[3].gelu.approximation, 'APPROXIMATION_TANH');
  assert.equal(back.loss.kind, 'huber');
  assert.equal(back.loss.huber.delta, 0.5);
  assert.equal(back.loss.reduction, 'REDUCTION_SUM');
  assert.equal(new gs.ModelBuilder().linear(1, 1).crossEntropy().build().loss.reduction,
               'REDUCTION_MEAN');
  assert.throws(() => new gs.ModelBuilder().linear(1, 1).build(), /without a loss/);
});

function fakeTree(root, protoAt, configAt) {
  fs.mkdirSync(path.join(root, protoAt, 'gradserve', 'v1'), {recursive: true});
  fs.writeFileSync(path.join(root, protoAt, 'gradserve', 'v1', 'gradserve.proto'), '');
  fs.mkdirSync(path.dirname(path.join(root, configAt)), {recursive: true});
  fs.writeFileSync(path.join(root, configAt), '{}');
}

test('the .proto files are found in a checkout, in a packed package, and nowhere else', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gradserve-node-'));
  try {
    // A checkout: client/node beside proto/ and client/service_config.json.
    fakeTree(path.join(tmp, 'repo'), 'proto', 'client/service_config.json');
    fs.mkdirSync(path.join(tmp, 'repo', 'client', 'node'));
    const inTree = gs.findResources(path.join(tmp, 'repo', 'client', 'node'));
    assert.equal(inTree.layout, 'in-tree');
    assert.equal(inTree.protoDir, path.join(tmp, 'repo', 'proto'));

    // Installed from `npm pack`'s tarball: the copies inside the package. The host project's own
    // proto/ two levels up must not be taken for ours.
    const pkg = path.join(tmp, 'app', 'node_modules', 'gradserve');
    fakeTree(pkg, 'proto', 'service_config.json');
    fakeTree(path.join(tmp, 'app'), 'node_modules/../proto', 'client/service_config.json');
    const packaged = gs.findResources(pkg);
    assert.equal(packaged.layout, 'packaged');
    assert.equal(packaged.protoDir, path.join(pkg, 'proto'));

    // A bare copy of client/node elsewhere: a clear error, not a half-loaded package.
    const bare = path.join(tmp, 'copy', 'client', 'node');
    fs.mkdirSync(bare, {recursive: true});
    assert.throws(() => gs.findResources(bare), /cannot find gradserve\/v1\/gradserve.proto.*npm pack/);
  } finally {
    fs.rmSync(tmp, {recursive: true, force: true});
  }
});

test('this checkout loads its own proto/ and client/service_config.json', () => {
  const found = gs.findResources();
  assert.equal(found.layout, 'in-tree');
  const shared = path.resolve(__dirname, '..', '..', 'service_config.json');
  assert.equal(gs.serviceConfig(), fs.readFileSync(shared, 'utf8'));
  const config = JSON.parse(gs.serviceConfig());
  assert.deepEqual(config.loadBalancingConfig, [{round_robin: {}}]);
  assert.deepEqual(config.methodConfig[0].retryPolicy.retryableStatusCodes, ['UNAVAILABLE']);
});

test('connect refuses inconsistent security options before any call', () => {
  assert.throws(() => gs.connect('127.0.0.1:1', {certFile: 'a.pem'}), /certFile and keyFile/);
  assert.throws(() => gs.connect('127.0.0.1:1', {token: 'has space'}), /visible ASCII/);
  assert.throws(() => gs.connect('127.0.0.1:1', {token: 'a', tokenFile: 'b'}), /not both/);
  assert.throws(() => gs.connect('127.0.0.1:1', {rootCaFile: '/nonexistent/ca.pem'}),
                /cannot read the TLS root CA file \/nonexistent\/ca.pem/);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gradserve-node-'));
  try {
    fs.writeFileSync(path.join(tmp, 'token'), 's3cret\n');
    assert.equal(gs.readTokenFile(path.join(tmp, 'token')), 's3cret');
    fs.writeFileSync(path.join(tmp, 'empty'), '\n');
    assert.throws(() => gs.readTokenFile(path.join(tmp, 'empty')), /is empty/);
  } finally {
    fs.rmSync(tmp, {recursive: true, force: true});
  }
});

test('status codes by name', () => {
  assert.equal(gs.statusName(3), 'INVALID_ARGUMENT');
  assert.equal(gs.statusName(14), 'UNAVAILABLE');
  assert.equal(gs.statusName(99), 'STATUS_99');
});
