'use strict';
// gradserve Node.js client: typed arrays <-> Tensor, a ModelBuilder for chain models, and a
// promise-returning client with the same channel policy as the C++ and Python clients.
//
//   const gs = require('gradserve');
//   const client = gs.connect('127.0.0.1:50051');
//   const model = new gs.ModelBuilder().linear(4, 2).relu().mse().build();
//   const response = await client.computeGradients({
//     model,
//     parameters: [gs.linearParameters(weight, [2, 4], bias)],   // Float32Array or Float64Array
//     inputs: gs.toTensor(x, [batch, 4]),
//     targets: gs.toTensor(y, [batch, 2]),
//   });
//   const dW = gs.fromTensor(response.gradients[0].weight).data;   // Float32Array / Float64Array
//
// Messages are plain objects with the .proto's field names (snake_case: keepCase), enums as
// their names ('DTYPE_FLOAT32'), and every int64/uint64 field as a decimal string, so no value
// is rounded through a double; requests accept numbers, strings or BigInts for them (see
// toBigInt / toSafeNumber).

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// --- Where the .proto files and the service config are -----------------------------------------

// Two layouts, checked in this order:
//   in-tree:   <repo>/client/node (this file), <repo>/proto, <repo>/client/service_config.json,
//              also when `npm install ./client/node` links the package into another project;
//   packaged:  <package>/proto and <package>/service_config.json, copied in by `npm pack`'s
//              prepack step (scripts/bundle-resources.js).
// In-tree comes first so that a checkout always loads the .proto it is at, never a stale copy.
// The in-tree test also checks the directory names, so that a package installed as
// node_modules/gradserve never mistakes its host project's proto/ for ours.
function findResources(packageDir = __dirname) {
  const repoDir = path.resolve(packageDir, '..', '..');
  const candidates = [];
  if (path.basename(packageDir) === 'node' && path.basename(path.dirname(packageDir)) === 'client') {
    candidates.push({
      layout: 'in-tree',
      protoDir: path.join(repoDir, 'proto'),
      serviceConfigFile: path.join(repoDir, 'client', 'service_config.json'),
    });
  }
  candidates.push({
    layout: 'packaged',
    protoDir: path.join(packageDir, 'proto'),
    serviceConfigFile: path.join(packageDir, 'service_config.json'),
  });
  for (const c of candidates) {
    if (fs.existsSync(path.join(c.protoDir, 'gradserve', 'v1', 'gradserve.proto')) &&
        fs.existsSync(c.serviceConfigFile)) {
      return c;
    }
  }
  throw new Error(
      `gradserve: cannot find gradserve/v1/gradserve.proto and service_config.json (looked in ${
        candidates.map((c) => c.protoDir).join(' and ')}); use the package inside a gradserve ` +
      'checkout (client/node), or a tarball made by `npm pack`, which bundles them');
}

// int64 as String: proto-loader's default turns them into JavaScript numbers, which silently
// round above 2^53 (a uint64 dropout_seed, an INT64 shape). keepCase: the field names of the
// .proto and of every other client's documentation. defaults: a zero loss or count reads as 0,
// not undefined. oneofs: `kind` names the member set in Layer, Loss and the stream messages.
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

let loaded = null;
function load() {
  if (loaded) return loaded;
  const resources = findResources();
  const definition = protoLoader.loadSync(
      ['gradserve/v1/gradserve.proto', 'grpc/health/v1/health.proto'],
      {...LOADER_OPTIONS, includeDirs: [resources.protoDir]});
  const pkg = grpc.loadPackageDefinition(definition);
  loaded = {
    resources,
    definition,
    GradientService: pkg.gradserve.v1.GradientService,
    Health: pkg.grpc.health.v1.Health,
  };
  return loaded;
}

// The gradserve.v1 message type `name` ("Tensor", "ComputeGradientsRequest"): serialize /
// deserialize exactly as a call does (for tests, and to save requests to files).
function messageType(name) {
  const type = load().definition[`gradserve.v1.${name}`];
  if (!type || !type.serialize) throw new Error(`gradserve: no message gradserve.v1.${name}`);
  return type;
}

// --- int64 ------------------------------------------------------------------------------------

// Any int64 field value (the decimal strings the client returns, a number, a BigInt, a Long)
// as a BigInt, exactly.
function toBigInt(value) {
  if (typeof value === 'bigint') return value;
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw new RangeError(`gradserve: ${value} is not an integer`);
    return BigInt(value);
  }
  if (typeof value === 'string' && /^-?\d+$/.test(value)) return BigInt(value);
  if (value && typeof value === 'object' && 'low' in value && 'high' in value) {
    return BigInt(value.toString());  // a Long
  }
  throw new TypeError(`gradserve: ${String(value)} is not an integer`);
}

// An int64 field value as a number, refusing (RangeError) one a double cannot hold exactly.
function toSafeNumber(value) {
  const big = toBigInt(value);
  const n = Number(big);
  if (!Number.isSafeInteger(n)) {
    throw new RangeError(`gradserve: ${big} is beyond 2^53 and would lose precision as a number; ` +
                         'use toBigInt');
  }
  return n;
}

// --- Tensors -----------------------------------------------------------------------------------

const DTYPES = Object.freeze({
  DTYPE_FLOAT32: {array: Float32Array, size: 4, name: 'float32'},
  DTYPE_FLOAT64: {array: Float64Array, size: 8, name: 'float64'},
  DTYPE_INT32: {array: Int32Array, size: 4, name: 'int32'},
  DTYPE_INT64: {array: BigInt64Array, size: 8, name: 'int64'},
  // Graph constants only (Where masks): one byte per element.
  DTYPE_BOOL: {array: Uint8Array, size: 1, name: 'bool'},
});
const DTYPE_BY_NUMBER = ['DTYPE_UNSPECIFIED', 'DTYPE_FLOAT32', 'DTYPE_FLOAT64', 'DTYPE_INT32',
  'DTYPE_INT64', 'DTYPE_BOOL'];
const DTYPE_ALIASES = {
  float32: 'DTYPE_FLOAT32', float64: 'DTYPE_FLOAT64', int32: 'DTYPE_INT32', int64: 'DTYPE_INT64',
  bool: 'DTYPE_BOOL',
};

function dtypeName(dtype) {
  if (typeof dtype === 'number') return DTYPE_BY_NUMBER[dtype] || `DTYPE(${dtype})`;
  return DTYPE_ALIASES[dtype] || dtype;
}

function dtypeOfArray(array) {
  for (const [name, info] of Object.entries(DTYPES)) {
    if (array instanceof info.array) return name;
  }
  return null;
}

// The wire is little-endian; a little-endian host (every platform Node ships for but s390x)
// copies bytes as they are, a big-endian one goes element by element through a DataView.
const HOST_LITTLE_ENDIAN = os.endianness() === 'LE';

function dataViewAccessors(dtype) {
  switch (dtype) {
    case 'DTYPE_FLOAT32': return ['getFloat32', 'setFloat32'];
    case 'DTYPE_FLOAT64': return ['getFloat64', 'setFloat64'];
    case 'DTYPE_INT32': return ['getInt32', 'setInt32'];
    case 'DTYPE_INT64': return ['getBigInt64', 'setBigInt64'];
    default: return ['getUint8', 'setUint8'];
  }
}

// Typed array -> little-endian bytes (a fresh Buffer). `littleEndianHost` is a parameter only so
// that the tests cover the big-endian path on a little-endian machine.
function encodeData(array, dtype, littleEndianHost = HOST_LITTLE_ENDIAN) {
  if (littleEndianHost || DTYPES[dtype].size === 1) {
    return Buffer.from(array.buffer.slice(array.byteOffset, array.byteOffset + array.byteLength));
  }
  const out = Buffer.alloc(array.byteLength);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const set = dataViewAccessors(dtype)[1];
  const size = DTYPES[dtype].size;
  for (let i = 0; i < array.length; i++) view[set](i * size, array[i], true);
  return out;
}

// Little-endian bytes -> a typed array of its own (copied: gRPC's buffers are slices of a shared
// pool at any offset, too unaligned for a Float64Array view).
function decodeData(bytes, dtype, littleEndianHost = HOST_LITTLE_ENDIAN) {
  const info = DTYPES[dtype];
  const count = bytes.length / info.size;
  const out = new info.array(count);
  if (littleEndianHost || info.size === 1) {
    new Uint8Array(out.buffer).set(bytes);
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const get = dataViewAccessors(dtype)[0];
  for (let i = 0; i < count; i++) out[i] = view[get](i * info.size, true);
  return out;
}

function checkShape(shape, what) {
  if (!Array.isArray(shape)) throw new TypeError(`gradserve: ${what}: shape must be an array`);
  let elements = 1n;
  for (const dim of shape) {
    const d = toBigInt(dim);
    if (d < 0n) throw new RangeError(`gradserve: ${what}: negative dimension in [${shape}]`);
    elements *= d;
  }
  return elements;
}

// A Tensor message from a typed array and a shape (default: rank 1). Float32Array ->
// DTYPE_FLOAT32, Float64Array -> DTYPE_FLOAT64, Int32Array -> DTYPE_INT32, BigInt64Array ->
// DTYPE_INT64, Uint8Array -> DTYPE_BOOL (0 or 1 per element). `dtype` ('float32', 'float64',
// 'int32', 'int64' or a DTYPE_ name) converts first, e.g. a plain Array or a Float64Array to
// float32. shape [] is a scalar (graph constants and parameters).
function toTensor(values, shape, dtype) {
  let array = values;
  let wire = dtype === undefined ? null : dtypeName(dtype);
  if (wire !== null && !DTYPES[wire]) {
    throw new TypeError(`gradserve: unknown dtype ${dtype}; use float32, float64, int32 or int64`);
  }
  const own = ArrayBuffer.isView(values) ? dtypeOfArray(values) : null;
  if (wire === null) {
    if (own === null) {
      throw new TypeError('gradserve: toTensor takes a Float32Array, Float64Array, Int32Array, ' +
                          'BigInt64Array or Uint8Array (or pass a dtype to convert other values)');
    }
    wire = own;
  } else if (own !== wire) {
    const Target = DTYPES[wire].array;
    array = wire === 'DTYPE_INT64' ? Target.from(values, (v) => toBigInt(v)) : Target.from(values);
  }
  const dims = shape === undefined ? [array.length] : shape;
  const elements = checkShape(dims, 'toTensor');
  if (elements !== BigInt(array.length)) {
    throw new RangeError(`gradserve: toTensor: shape [${dims}] holds ${elements} elements, ` +
                         `the array has ${array.length}`);
  }
  // Numbers go on the wire as they are; a BigInt dimension as its decimal string (exact).
  const wireShape = dims.map((d) => (typeof d === 'bigint' ? d.toString() : d));
  return {dtype: wire, shape: wireShape, data: encodeData(array, wire)};
}

// A Tensor message -> {dtype: 'DTYPE_FLOAT32', shape: [numbers], data: TypedArray}. Throws if
// the byte length is not product(shape) * element size, or a dimension is beyond 2^53.
function fromTensor(tensor, littleEndianHost = HOST_LITTLE_ENDIAN) {
  if (!tensor) throw new TypeError('gradserve: fromTensor: no tensor (field not set?)');
  const dtype = dtypeName(tensor.dtype);
  const info = DTYPES[dtype];
  if (!info) throw new TypeError(`gradserve: fromTensor: unsupported dtype ${dtype}`);
  const shape = (tensor.shape || []).map((d) => toSafeNumber(d));
  const elements = checkShape(shape, 'fromTensor');
  const bytes = tensor.data || Buffer.alloc(0);
  const expected = elements * BigInt(info.size);
  if (BigInt(bytes.length) !== expected) {
    throw new RangeError(`gradserve: tensor of shape [${shape}] and ${dtype} needs ${expected} ` +
                         `bytes, has ${bytes.length}`);
  }
  return {dtype, shape, data: decodeData(bytes, dtype, littleEndianHost)};
}

// One Linear layer's parameters (nn.Linear layout: weight [out, in], bias [out]); bias may be
// left out for a layer built with {bias: false}.
function linearParameters(weight, weightShape, bias) {
  const entry = {weight: toTensor(weight, weightShape)};
  if (bias !== undefined && bias !== null) entry.bias = toTensor(bias, [bias.length]);
  return entry;
}

// [{weight, bias}] per Linear layer of a chain model's response, each as fromTensor returns it
// (bias null for a layer without one).
function gradients(response) {
  return response.gradients.map((g) => ({
    weight: fromTensor(g.weight),
    bias: g.bias ? fromTensor(g.bias) : null,
  }));
}

// Graph models: {name: tensor} -> NamedTensor messages. A value may be a Tensor message, a
// typed array (rank 1), or {data, shape, dtype?} as toTensor takes it.
function namedTensors(values) {
  return Object.entries(values).map(([name, value]) => {
    let tensor;
    if (ArrayBuffer.isView(value)) tensor = toTensor(value);
    else if (value && 'data' in value && !Buffer.isBuffer(value.data)) {
      tensor = toTensor(value.data, value.shape, value.dtype);
    } else tensor = value;
    return {name, tensor};
  });
}

// NamedTensor messages (named_gradients, input_gradients, outputs) -> {name: fromTensor(...)}.
function namedArrays(namedList) {
  const out = {};
  for (const {name, tensor} of namedList) out[name] = fromTensor(tensor);
  return out;
}

// --- Models --------------------------------------------------------------------------------------

function reductionName(reduction) {
  if (reduction === undefined) return 'REDUCTION_MEAN';
  const upper = String(reduction).toUpperCase();
  return upper.startsWith('REDUCTION_') ? upper : `REDUCTION_${upper}`;
}

// Fluent construction of a chain Model, as the C++ gradserve::client::ModelBuilder.
class ModelBuilder {
  constructor() {
    this._layers = [];
    this._loss = null;
  }
  _add(kind, value) {
    this._layers.push({[kind]: value});
    return this;
  }
  linear(inFeatures, outFeatures, {bias = true} = {}) {
    const linear = {in_features: inFeatures, out_features: outFeatures};
    if (!bias) linear.bias = false;
    return this._add('linear', linear);
  }
  relu() { return this._add('relu', {}); }
  leakyRelu(negativeSlope = 0.01) { return this._add('leaky_relu', {negative_slope: negativeSlope}); }
  sigmoid() { return this._add('sigmoid', {}); }
  tanh() { return this._add('tanh', {}); }
  gelu({tanh = false} = {}) {
    return this._add('gelu', {approximation: tanh ? 'APPROXIMATION_TANH' : 'APPROXIMATION_NONE'});
  }
  identity() { return this._add('identity', {}); }
  // Names the layer added last (shown in diagnostics and errors).
  named(name) {
    if (this._layers.length === 0) throw new Error('gradserve: ModelBuilder.named before any layer');
    this._layers[this._layers.length - 1].name = name;
    return this;
  }
  _setLoss(kind, value, reduction) {
    this._loss = {[kind]: value, reduction: reductionName(reduction)};
    return this;
  }
  mse(reduction) { return this._setLoss('mse', {}, reduction); }
  l1(reduction) { return this._setLoss('l1', {}, reduction); }
  huber(delta = 1.0, reduction) { return this._setLoss('huber', {delta}, reduction); }
  crossEntropy(reduction) { return this._setLoss('cross_entropy', {}, reduction); }
  bceWithLogits(reduction) { return this._setLoss('bce_with_logits', {}, reduction); }
  external() { return this._setLoss('external', {}); }
  build() {
    if (!this._loss) throw new Error('gradserve: ModelBuilder.build without a loss (mse(), ...)');
    return {layers: this._layers.map((l) => ({...l})), loss: {...this._loss}};
  }
}

// --- Connecting --------------------------------------------------------------------------------

const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024;  // the server's default --max-message-bytes
const DEFAULT_TIMEOUT_MS = 60000;

function statusName(code) {
  for (const [name, value] of Object.entries(grpc.status)) {
    if (value === code) return name;
  }
  return `STATUS_${code}`;
}

// A failed call: `code` is the gRPC status number, `codeName` its name ('INVALID_ARGUMENT'),
// `details` the server's message (which names the offending field).
class GradserveError extends Error {
  constructor(method, error) {
    const codeName = statusName(error.code);
    super(`${method}: ${codeName}: ${error.details !== undefined ? error.details : error.message}`);
    this.name = 'GradserveError';
    this.method = method;
    this.code = error.code;
    this.codeName = codeName;
    this.details = error.details;
    this.metadata = error.metadata;
    this.cause = error;
  }
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new Error(`gradserve: cannot read the ${what} ${file}: ${error.message}`);
  }
}

// The server's rule for a token: visible ASCII, no spaces (it follows "Bearer ").
function checkToken(token, source) {
  if (!token) throw new Error(`gradserve: ${source} is empty`);
  if (!/^[\x21-\x7e]+$/.test(token)) {
    throw new Error(`gradserve: ${source}: a token may hold only visible ASCII characters ` +
                    '(no spaces)');
  }
  return token;
}

function readTokenFile(file) {
  const token = readFile(file, 'token file').toString('latin1').replace(/[\r\n]+$/, '');
  return checkToken(token, `the token file ${file}`);
}

function bearerToken({token, tokenFile, tokenEnv = 'GRADSERVE_AUTH_TOKEN'}) {
  if (token !== undefined && tokenFile !== undefined) {
    throw new Error('gradserve: give token or tokenFile, not both');
  }
  if (token !== undefined) return checkToken(token, 'token');
  if (tokenFile !== undefined) return readTokenFile(tokenFile);
  const fromEnv = tokenEnv ? (process.env[tokenEnv] || '').replace(/[\r\n]+$/, '') : '';
  return fromEnv ? checkToken(fromEnv, tokenEnv) : null;
}

// The JSON text of client/service_config.json (round_robin, UNAVAILABLE retried up to 4 more
// times), parsed once here so that a typo fails at connect instead of disabling the policy.
function serviceConfig(file = load().resources.serviceConfigFile) {
  const text = readFile(file, 'service config').toString('utf8');
  JSON.parse(text);
  return text;
}

// Per-call metadata rather than call credentials: grpc-js, like every gRPC, refuses to compose
// call credentials with an insecure channel, and a plaintext channel with a token is legitimate
// behind a TLS-terminating proxy (the C++ and Python clients make the same choice).
function bearerInterceptor(token) {
  const header = `Bearer ${token}`;
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', header);
      next(metadata, listener);
    },
  });
}

function channelSetup(options = {}) {
  const {
    tls = false, rootCaFile, certFile, keyFile, serverNameOverride,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, retryUnavailable = true, channelOptions = {},
  } = options;
  // Any TLS file or name override means TLS: never a silent fallback to plaintext.
  const useTls = tls || [rootCaFile, certFile, keyFile, serverNameOverride]
      .some((x) => x !== undefined);
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new Error('gradserve: a client certificate needs its private key and a key its ' +
                    'certificate: give certFile and keyFile together');
  }
  const credentials = useTls ?
    grpc.credentials.createSsl(
        rootCaFile !== undefined ? readFile(rootCaFile, 'TLS root CA file') : null,
        keyFile !== undefined ? readFile(keyFile, 'TLS key file') : null,
        certFile !== undefined ? readFile(certFile, 'TLS certificate file') : null) :
    grpc.credentials.createInsecure();
  const channel = {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.service_config': serviceConfig(),
  };
  // A channel to one replica of several that a caller fails over itself: retrying here would
  // only delay the move to the next replica (the C++ ClientOptions::retry_unavailable).
  if (!retryUnavailable) channel['grpc.enable_retries'] = 0;
  if (serverNameOverride !== undefined) {
    channel['grpc.ssl_target_name_override'] = serverNameOverride;
    channel['grpc.default_authority'] = serverNameOverride;
  }
  Object.assign(channel, channelOptions);
  const token = bearerToken(options);
  const interceptors = token === null ? [] : [bearerInterceptor(token)];
  return {credentials, channel, interceptors};
}

function deadlineOf(callOptions, defaultTimeoutMs) {
  if (callOptions.deadline !== undefined) return callOptions.deadline;
  const ms = callOptions.timeoutMs !== undefined ? callOptions.timeoutMs : defaultTimeoutMs;
  return new Date(Date.now() + ms);
}

function unary(stub, method, rpcName, request, callOptions, defaultTimeoutMs) {
  return new Promise((resolve, reject) => {
    stub[method](request, new grpc.Metadata(),
        {deadline: deadlineOf(callOptions, defaultTimeoutMs)}, (error, response) => {
          if (error) reject(new GradserveError(rpcName, error));
          else resolve(response);
        });
  });
}

// GradientService with a deadline on every call. Each method takes {timeoutMs} or {deadline}
// (a Date or ms since the epoch) and returns a promise of the response, or rejects with a
// GradserveError. `stub` is the grpc-js client itself (StreamGradients, or anything else).
class GradientClient {
  constructor(target, options = {}) {
    const {GradientService, Health} = load();
    const {credentials, channel, interceptors} = channelSetup(options);
    this.target = target;
    this.timeoutMs = options.timeoutMs !== undefined ? options.timeoutMs : DEFAULT_TIMEOUT_MS;
    this.stub = new GradientService(target, credentials, {...channel, interceptors});
    // Shares the stub's channel, so health and gradients see the same connection.
    this._health = new Health(target, credentials, {channelOverride: this.stub.getChannel()});
  }
  computeGradients(request, callOptions = {}) {
    return unary(this.stub, 'ComputeGradients', 'ComputeGradients', request, callOptions,
                 this.timeoutMs);
  }
  checkGradients(request, callOptions = {}) {
    return unary(this.stub, 'CheckGradients', 'CheckGradients', request, callOptions,
                 this.timeoutMs);
  }
  getServerInfo(callOptions = {}) {
    return unary(this.stub, 'GetServerInfo', 'GetServerInfo', {}, callOptions, this.timeoutMs);
  }
  getStats(callOptions = {}) {
    return unary(this.stub, 'GetStats', 'GetStats', {}, callOptions, this.timeoutMs);
  }
  // grpc.health.v1 Check: 'SERVING', 'NOT_SERVING' (draining after SIGTERM), 'SERVICE_UNKNOWN'
  // or 'UNKNOWN'. service: '' for the server, or 'gradserve.v1.GradientService'.
  async health(service = '', callOptions = {}) {
    const response = await unary(this._health, 'Check', 'Health.Check', {service},
                                 {timeoutMs: 10000, ...callOptions}, this.timeoutMs);
    return response.status;
  }
  close() {
    this._health.close();
    this.stub.close();
  }
}

// A client for `target` ('127.0.0.1:50051', 'dns:///gradserve:50051', 'ipv4:a:p,b:p'):
//   tls, rootCaFile, certFile + keyFile (mutual TLS), serverNameOverride  (any of them: TLS)
//   token | tokenFile | $GRADSERVE_AUTH_TOKEN (tokenEnv: null ignores it)  bearer token
//   maxMessageBytes (256 MiB, as the server), timeoutMs (60 s per call), retryUnavailable (true),
//   channelOptions (more grpc-js channel options)
// Files are read now; a bad one throws here rather than on the first call.
function connect(target, options = {}) {
  return new GradientClient(target, options);
}

// One health check on a fresh channel (connect options apply), closed afterwards.
async function health(target, service = '', options = {}) {
  const client = connect(target, options);
  try {
    return await client.health(service, options);
  } finally {
    client.close();
  }
}

module.exports = {
  connect,
  health,
  GradientClient,
  GradserveError,
  ModelBuilder,
  toTensor,
  fromTensor,
  linearParameters,
  gradients,
  namedTensors,
  namedArrays,
  toBigInt,
  toSafeNumber,
  statusName,
  serviceConfig,
  findResources,
  messageType,
  readTokenFile,
  LOADER_OPTIONS,
  DEFAULT_MAX_MESSAGE_BYTES,
  grpc,
  // For the tests: the byte-order-neutral paths, callable on either kind of host.
  _encodeData: encodeData,
  _decodeData: decodeData,
};
