// Types for the gradserve Node.js client (index.js). Messages are plain objects with the
// .proto's snake_case field names; enums are their names; every int64/uint64 field a response
// holds is a decimal string (Int64), and requests take a number, string or bigint for one.
import * as grpc from '@grpc/grpc-js';

export {grpc};

/** An int64/uint64 as received: a decimal string, exact. */
export type Int64 = string;
/** An int64/uint64 as sent: numbers must be safe integers; strings and bigints are exact. */
export type Int64Like = number | string | bigint;

export type DTypeName =
  'DTYPE_UNSPECIFIED' | 'DTYPE_FLOAT32' | 'DTYPE_FLOAT64' | 'DTYPE_INT32' | 'DTYPE_INT64' |
  'DTYPE_BOOL';
export type DTypeAlias = 'float32' | 'float64' | 'int32' | 'int64' | 'bool';
export type ReductionName = 'mean' | 'sum' | 'REDUCTION_MEAN' | 'REDUCTION_SUM';

export type TypedTensorArray =
  Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array;

/** The wire form of gradserve.v1.Tensor. */
export interface Tensor {
  dtype: DTypeName | number;
  shape: Int64Like[];
  data: Uint8Array;
}

/** A decoded tensor: shape as numbers (each a safe integer), data in host order. */
export interface DecodedTensor<A extends TypedTensorArray = TypedTensorArray> {
  dtype: DTypeName;
  shape: number[];
  data: A;
}

export function toTensor(values: TypedTensorArray, shape?: Int64Like[]): Tensor;
export function toTensor(
  values: ArrayLike<number | bigint> | TypedTensorArray, shape: Int64Like[] | undefined,
  dtype: DTypeAlias | DTypeName): Tensor;
/** Throws if the byte length is not product(shape) x element size. */
export function fromTensor(tensor: Tensor): DecodedTensor;

export interface LinearParameters { weight: Tensor; bias?: Tensor; }
export function linearParameters(
  weight: Float32Array | Float64Array, weightShape: [Int64Like, Int64Like],
  bias?: Float32Array | Float64Array | null): LinearParameters;
export function gradients(response: ComputeGradientsResponse):
  {weight: DecodedTensor; bias: DecodedTensor | null}[];

export interface NamedTensor { name: string; tensor: Tensor; }
export function namedTensors(values: Record<string,
  Tensor | TypedTensorArray |
  {data: TypedTensorArray | ArrayLike<number>; shape?: Int64Like[]; dtype?: DTypeAlias | DTypeName}>
): NamedTensor[];
export function namedArrays(named: NamedTensor[]): Record<string, DecodedTensor>;

/** Exact: any int64 field value (string, number, bigint, Long) as a bigint. */
export function toBigInt(value: Int64Like | {low: number; high: number}): bigint;
/** As a number; throws RangeError beyond Number.MAX_SAFE_INTEGER. */
export function toSafeNumber(value: Int64Like): number;

/** A chain model (Model.layers + Model.loss), as the C++ ModelBuilder builds it. */
export interface Model {
  layers?: Record<string, unknown>[];
  loss: Record<string, unknown>;
  graph?: Record<string, unknown>;
  onnx?: Record<string, unknown>;
}

export class ModelBuilder {
  linear(inFeatures: number, outFeatures: number, options?: {bias?: boolean}): this;
  relu(): this;
  leakyRelu(negativeSlope?: number): this;
  sigmoid(): this;
  tanh(): this;
  gelu(options?: {tanh?: boolean}): this;
  identity(): this;
  /** Names the layer added last (diagnostics, errors). */
  named(name: string): this;
  mse(reduction?: ReductionName): this;
  l1(reduction?: ReductionName): this;
  huber(delta?: number, reduction?: ReductionName): this;
  crossEntropy(reduction?: ReductionName): this;
  bceWithLogits(reduction?: ReductionName): this;
  external(): this;
  build(): Model;
}

export interface ComputeOptions {
  return_input_gradient?: boolean;
  return_output?: boolean;
  checkpointing?: {mode?: string; every_k?: Int64Like; memory_budget_bytes?: Int64Like};
  allow_non_finite?: boolean;
  input_gradient_names?: string[];
  dropout_seed?: Int64Like;
}

export interface ComputeGradientsRequest {
  model: Model;
  parameters?: LinearParameters[];
  inputs?: Tensor;
  targets?: Tensor;
  output_gradient?: Tensor;
  options?: ComputeOptions;
  named_parameters?: NamedTensor[];
  graph_inputs?: NamedTensor[];
}

export interface LayerDiagnostics {
  layer_index: number;
  kind: string;
  name: string;
  /** Absent when that gradient was not computed (Note [Diagnostics rule] in gradserve.proto). */
  weight_grad_norm?: number;
  bias_grad_norm?: number;
  output_grad_norm?: number;
  activation_norm: number;
  non_finite_count: Int64;
}

export interface ComputeStats {
  forward_micros: number;
  backward_micros: number;
  peak_activation_bytes: Int64;
  layers_recomputed: Int64;
  plan: Record<string, unknown> | null;
  num_examples: Int64;
  threads: number;
}

export interface ComputeGradientsResponse {
  loss: number;
  gradients: {weight: Tensor; bias: Tensor | null}[];
  input_gradient: Tensor | null;
  output: Tensor | null;
  diagnostics: LayerDiagnostics[];
  stats: ComputeStats | null;
  named_gradients: NamedTensor[];
  input_gradients: NamedTensor[];
  outputs: NamedTensor[];
  parameter_diagnostics: {name: string; grad_norm: number; non_finite_count: Int64}[];
  value_diagnostics: Record<string, unknown>[];
}

export interface CheckGradientsRequest {
  request: ComputeGradientsRequest;
  samples_per_tensor?: number;
  step?: number;
  seed?: Int64Like;
}

export interface CheckGradientsResponse {
  checks: {tensor: string; layer_index: number; samples: number; max_abs_error: number;
           max_rel_error: number}[];
  max_abs_error: number;
  max_rel_error: number;
  analytic_dtype: DTypeName;
}

/** GetServerInfoResponse and GetStatsResponse, as the .proto describes them. */
export type GetServerInfoResponse = Record<string, any>;
export type GetStatsResponse = Record<string, any>;

export interface CallOptions {
  /** Milliseconds from now (default: the client's timeoutMs, 60 s). */
  timeoutMs?: number;
  /** An absolute deadline instead. */
  deadline?: Date | number;
}

export interface ConnectOptions {
  tls?: boolean;
  rootCaFile?: string;
  certFile?: string;
  keyFile?: string;
  serverNameOverride?: string;
  token?: string;
  tokenFile?: string;
  /** Environment variable holding the token; null: none. Default GRADSERVE_AUTH_TOKEN. */
  tokenEnv?: string | null;
  /** Both directions; default 256 MiB, the server's default. */
  maxMessageBytes?: number;
  /** Default deadline of every call, ms (60 000). */
  timeoutMs?: number;
  /** Retry UNAVAILABLE per client/service_config.json (default true). */
  retryUnavailable?: boolean;
  channelOptions?: grpc.ChannelOptions;
}

export type HealthStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

export class GradientClient {
  constructor(target: string, options?: ConnectOptions);
  readonly target: string;
  readonly timeoutMs: number;
  /** The grpc-js client (StreamGradients, or any call by hand). */
  readonly stub: grpc.Client & Record<string, any>;
  computeGradients(request: ComputeGradientsRequest, options?: CallOptions):
    Promise<ComputeGradientsResponse>;
  checkGradients(request: CheckGradientsRequest, options?: CallOptions):
    Promise<CheckGradientsResponse>;
  getServerInfo(options?: CallOptions): Promise<GetServerInfoResponse>;
  getStats(options?: CallOptions): Promise<GetStatsResponse>;
  health(service?: string, options?: CallOptions): Promise<HealthStatus>;
  close(): void;
}

export function connect(target: string, options?: ConnectOptions): GradientClient;
export function health(target: string, service?: string,
                       options?: ConnectOptions & CallOptions): Promise<HealthStatus>;

/** A failed call; the message reads "ComputeGradients: INVALID_ARGUMENT: <details>". */
export class GradserveError extends Error {
  readonly method: string;
  readonly code: grpc.status;
  readonly codeName: string;
  readonly details: string;
  readonly metadata: grpc.Metadata;
}

export function statusName(code: number): string;
export function serviceConfig(file?: string): string;
export function readTokenFile(file: string): string;
export function findResources(packageDir?: string):
  {layout: 'in-tree' | 'packaged'; protoDir: string; serviceConfigFile: string};
/** A gradserve.v1 message type as proto-loader loads it (serialize/deserialize). */
export function messageType(name: string): {
  serialize(message: object): Buffer;
  deserialize(bytes: Uint8Array): any;
};
export const LOADER_OPTIONS: Readonly<Record<string, unknown>>;
export const DEFAULT_MAX_MESSAGE_BYTES: number;
