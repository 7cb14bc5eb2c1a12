"""Unit tests of gradserve.sharded.ShardedClient against fake replicas (no server, no torch).

    client/python/generate.sh
    PYTHONPATH=client/python /usr/bin/python3 -m unittest discover -s client/python/tests -v

The fake replica answers like gradserve for a model whose "gradient" is a per-row statistic of
the batch (the mean, or the sum, of the inputs' rows), so a combination that weighs, orders or
slices wrongly gives a different number. The same checks against real servers are in
tests/e2e/python_sharded.py.
"""

import threading
import unittest

import grpc
import numpy as np

from gradserve import client as gc
from gradserve.client import pb
from gradserve.sharded import ShardedCallStats, ShardedClient, ShardedError, split_rows


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details="fake"):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def fake_answer(request):
    """A ComputeGradientsResponse computed from the batch: gradient = the rows' mean (MEAN)
    or sum (SUM) of the inputs, loss = the same of the targets; graph models the same under
    the name "w" over graph input "x", weighted by the positions of "y" not equal to -100."""
    sum_ = request.model.loss.reduction == pb.REDUCTION_SUM
    response = pb.ComputeGradientsResponse()
    if request.model.HasField("graph"):
        inputs = gc.named_arrays(request.graph_inputs)
        x, y = inputs["x"], inputs["y"]
        keep = (y != -100).reshape(-1)
        total = x[keep].sum(axis=0, dtype=np.float64)
        n = int(keep.sum())
        grad = total if sum_ else (total / n if n else np.zeros_like(total))
        response.named_gradients.add(name="w", tensor=gc.to_tensor(grad.astype(x.dtype)))
        response.named_gradients.add(name="v", tensor=gc.to_tensor(-grad.astype(x.dtype)))
        response.loss = float(n) if sum_ else (float("nan") if n == 0 else 1.0)
        response.stats.num_examples = x.shape[0]
        return response
    x, t = gc.from_tensor(request.inputs), gc.from_tensor(request.targets)
    reduce = (lambda a: a.sum(axis=0, dtype=np.float64)) if sum_ else \
        (lambda a: a.mean(axis=0, dtype=np.float64))
    g = response.gradients.add()
    g.weight.CopyFrom(gc.to_tensor(reduce(x).astype(x.dtype)[None, :]))
    g.bias.CopyFrom(gc.to_tensor(reduce(t).astype(x.dtype)))
    response.loss = float(reduce(t).sum())
    response.stats.num_examples = x.shape[0]
    # Per-call fields the combination drops (kept only when there is one part).
    response.stats.forward_micros = 7
    response.diagnostics.add()
    return response


class FakeReplica:
    """A stub: answers with fake_answer, or raises the errors queued in `fail` first; records
    every call as (replica name, first row's x[0])."""

    def __init__(self, name, log, fail=(), before_answer=None):
        self.name, self.log, self.fail = name, log, list(fail)
        self.before_answer = before_answer
        self.lock = threading.Lock()

    def ComputeGradients(self, request, timeout=None, metadata=None):
        first = (gc.named_arrays(request.graph_inputs)["x"] if request.model.HasField("graph")
                 else gc.from_tensor(request.inputs))[0, 0]
        with self.lock:
            self.log.append((self.name, float(first), metadata))
            error = self.fail.pop(0) if self.fail else None
        if error is not None:
            raise FakeRpcError(error, f"{self.name} says {error.name}")
        if self.before_answer:
            self.before_answer(request)
        return fake_answer(request)


def chain_request(batch=10, features=3, dtype=np.float32, reduction="mean", seed=0):
    rng = np.random.default_rng(seed)
    request = pb.ComputeGradientsRequest()
    request.model.layers.add().linear.CopyFrom(pb.Linear(in_features=features,
                                                         out_features=1))
    request.model.loss.CopyFrom(gc.loss("mse", reduction))
    # Row r's first input is r, so a part's first row says which rows it was sent.
    x = rng.standard_normal((batch, features)).astype(dtype)
    x[:, 0] = np.arange(batch)
    request.inputs.CopyFrom(gc.to_tensor(x))
    request.targets.CopyFrom(gc.to_tensor(rng.standard_normal((batch, 1)).astype(dtype)))
    return request, x


def replicas(count, log, **kwargs):
    return [FakeReplica(f"r{i}", log, **kwargs) for i in range(count)]


class SplitTest(unittest.TestCase):
    def test_layout(self):
        self.assertEqual(split_rows(10, 3), [(0, 4), (4, 3), (7, 3)])
        self.assertEqual(split_rows(11, 3), [(0, 4), (4, 4), (8, 3)])
        self.assertEqual(split_rows(2, 5), [(0, 1), (1, 1)])
        self.assertEqual(split_rows(7, 1), [(0, 7)])

    def test_parts_go_to_their_replicas_with_their_rows(self):
        log = []
        request, _ = chain_request(batch=10)
        ShardedClient(replicas(3, log)).compute_gradients(request)
        self.assertEqual(sorted((name, row) for name, row, _ in log),
                         [("r0", 0.0), ("r1", 4.0), ("r2", 7.0)])

    def test_more_shards_than_rows(self):
        log = []
        request, _ = chain_request(batch=2)
        response = ShardedClient(replicas(3, log)).compute_gradients(request, shards=5)
        self.assertEqual(len(log), 2)
        self.assertEqual(response.stats.num_examples, 2)


class CombineTest(unittest.TestCase):
    def check_mean(self, dtype):
        request, x = chain_request(batch=10, dtype=dtype)
        log = []
        response = ShardedClient(replicas(3, log)).compute_gradients(request)
        # By hand: each part's mean in the wire dtype, weighted by its rows in float64, summed
        # in part order from +0.0, divided by the batch, rounded once to the wire dtype.
        expected = np.zeros(x.shape[1])
        for begin, rows in split_rows(10, 3):
            part_mean = x[begin:begin + rows].mean(axis=0, dtype=np.float64).astype(dtype)
            expected = expected + part_mean.astype(np.float64) * rows
        expected = (expected / 10).astype(dtype)
        got = gc.from_tensor(response.gradients[0].weight)[0]
        self.assertEqual(got.dtype, np.dtype(dtype))
        self.assertEqual(got.tobytes(), expected.tobytes(),
                         f"max |diff| {np.abs(got - expected).max()}")
        np.testing.assert_allclose(got, x.mean(axis=0, dtype=np.float64),
                                   rtol=1e-6 if dtype == np.float32 else 1e-14)
        self.assertEqual(response.stats.num_examples, 10)
        # Per-call fields are not combined.
        self.assertEqual(response.stats.forward_micros, 0)
        self.assertEqual(len(response.diagnostics), 0)

    def test_mean_weighs_parts_by_examples_float32(self):
        self.check_mean(np.float32)

    def test_mean_weighs_parts_by_examples_float64(self):
        self.check_mean(np.float64)

    def test_sum_adds(self):
        request, x = chain_request(batch=9, reduction="sum", dtype=np.float64)
        response = ShardedClient(replicas(2, [])).compute_gradients(request, shards=3)
        got = gc.from_tensor(response.gradients[0].weight)[0]
        np.testing.assert_allclose(got, x.sum(axis=0), rtol=1e-14)
        self.assertEqual(response.stats.num_examples, 9)

    def test_one_part_is_the_answer_unchanged(self):
        request, _ = chain_request(batch=5)
        response = ShardedClient(replicas(3, [])).compute_gradients(request, shards=1)
        self.assertEqual(response.SerializeToString(),
                         fake_answer(request).SerializeToString())

    def test_same_bits_whatever_order_the_answers_arrive_in(self):
        request, _ = chain_request(batch=12, features=64, seed=3, dtype=np.float64)
        in_order = ShardedClient(replicas(3, [])).compute_gradients(request)
        # Part 0 answers only after part 2 has, part 1 only after part 0: arrival order 2, 0, 1.
        answered = {i: threading.Event() for i in range(3)}
        waits_for = {0: 2, 1: 0}

        def gate(part_request):
            first_row = int(gc.from_tensor(part_request.inputs)[0, 0])
            index = {0: 0, 4: 1, 8: 2}[first_row]
            if index in waits_for:
                self.assertTrue(answered[waits_for[index]].wait(10))
            # Marked before the answer is built: close enough, since the waits above already
            # force the order in which the answers are produced.
            answered[index].set()

        reordered = ShardedClient(replicas(3, [], before_answer=gate)).compute_gradients(request)
        self.assertEqual(reordered.SerializeToString(), in_order.SerializeToString())

    def test_graph_cross_entropy_weighs_by_positions_not_ignored(self):
        request = pb.ComputeGradientsRequest()
        request.model.graph.loss_target = "y"
        request.model.loss.cross_entropy.SetInParent()
        x = np.arange(12, dtype=np.float64).reshape(6, 2)
        # Part 0 (rows 0-1) has 1 counted position, part 1 (rows 2-3) none, part 2 both.
        y = np.array([[3], [-100], [-100], [-100], [1], [2]], dtype=np.int64)
        request.graph_inputs.extend(gc.named_tensors({"x": x, "y": y}))
        response = ShardedClient(replicas(3, [])).compute_gradients(request)
        grads = gc.named_arrays(response.named_gradients)
        self.assertEqual(list(grads), ["w", "v"])
        keep = (y != -100)[:, 0]
        np.testing.assert_allclose(grads["w"], x[keep].mean(axis=0), rtol=1e-15)
        np.testing.assert_allclose(grads["v"], -x[keep].mean(axis=0), rtol=1e-15)
        # Part 1's NaN loss is left out.
        self.assertEqual(response.loss, 1.0)
        self.assertEqual(response.stats.num_examples, 6)

    def test_graph_cross_entropy_with_every_position_ignored_is_nan(self):
        request = pb.ComputeGradientsRequest()
        request.model.graph.loss_target = "y"
        request.model.loss.cross_entropy.ignore_index = 7
        x = np.ones((4, 2))
        request.graph_inputs.extend(gc.named_tensors({"x": x, "y": np.full((4, 1), 7)}))
        # The fake ignores -100, not 7, so it computes means; the client must still leave all
        # parts out because it counts by the request's ignore_index.
        response = ShardedClient(replicas(2, [])).compute_gradients(request)
        self.assertTrue(np.isnan(response.loss))
        self.assertEqual(gc.named_arrays(response.named_gradients)["w"].tolist(), [0.0, 0.0])


class RetryTest(unittest.TestCase):
    def client(self, reps, **kwargs):
        return ShardedClient(reps, initial_backoff=0.001, **kwargs)

    def test_cancelled_by_a_replica_shutting_down_moves_to_the_next(self):
        log = []
        reps = replicas(3, log)
        reps[1].fail = [grpc.StatusCode.CANCELLED]
        request, _ = chain_request(batch=9)
        response = self.client(reps).compute_gradients(request)
        self.assertEqual(sorted((n, r) for n, r, _ in log),
                         [("r0", 0.0), ("r1", 3.0), ("r2", 3.0), ("r2", 6.0)])
        expected = self.client(replicas(3, [])).compute_gradients(request)
        self.assertEqual(response.SerializeToString(), expected.SerializeToString())

    def test_unavailable_moves_to_the_next_replica_counted_once(self):
        log = []
        reps = replicas(3, log)
        reps[1].fail = [grpc.StatusCode.UNAVAILABLE]
        request, _ = chain_request(batch=9)
        stats = ShardedCallStats()
        response = self.client(reps).compute_gradients(request, stats=stats)
        self.assertEqual(sorted((n, r) for n, r, _ in log),
                         [("r0", 0.0), ("r1", 3.0), ("r2", 3.0), ("r2", 6.0)])
        expected = self.client(replicas(3, [])).compute_gradients(request)
        self.assertEqual(response.SerializeToString(), expected.SerializeToString())
        # Every attempt's request counted, only answers received: 3 parts of 3 rows, one
        # sent twice.
        part = pb.ComputeGradientsRequest()
        part.CopyFrom(request)
        part.inputs.CopyFrom(gc.to_tensor(gc.from_tensor(request.inputs)[3:6]))
        part.targets.CopyFrom(gc.to_tensor(gc.from_tensor(request.targets)[3:6]))
        self.assertEqual(stats.attempts, 4)
        self.assertEqual(stats.bytes_sent, 4 * part.ByteSize())
        self.assertEqual(stats.bytes_received,
                         sum(fake_answer(p).ByteSize() for p in [part] * 3))

    def test_deadline_exceeded_is_retried(self):
        log = []
        reps = replicas(2, log)
        reps[0].fail = [grpc.StatusCode.DEADLINE_EXCEEDED]
        request, _ = chain_request(batch=4)
        self.client(reps).compute_gradients(request)
        self.assertEqual(sorted((n, r) for n, r, _ in log),
                         [("r0", 0.0), ("r1", 0.0), ("r1", 2.0)])

    def test_out_of_attempts_names_the_part(self):
        log = []
        reps = replicas(2, log, fail=[grpc.StatusCode.UNAVAILABLE] * 10)
        request, _ = chain_request(batch=7)
        stats = ShardedCallStats()
        with self.assertRaises(ShardedError) as raised:
            self.client(reps, max_attempts=3).compute_gradients(request, stats=stats)
        self.assertEqual((stats.attempts, stats.bytes_received), (6, 0))
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertTrue(raised.exception.details().startswith("shard 0 of 2 (rows 0..3): "),
                        raised.exception.details())
        self.assertEqual(len(log), 6)  # 3 attempts of each part

    def test_other_errors_are_not_retried(self):
        log = []
        reps = replicas(3, log)
        reps[2].fail = [grpc.StatusCode.INVALID_ARGUMENT]
        request, _ = chain_request(batch=6)
        with self.assertRaises(grpc.RpcError) as raised:
            self.client(reps).compute_gradients(request)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(raised.exception.details(), "shard 2 of 3 (rows 4..5): r2 says "
                         "INVALID_ARGUMENT")
        self.assertEqual(len(log), 3)

    def test_token_goes_with_every_attempt(self):
        log = []
        reps = replicas(2, log)
        reps[0].fail = [grpc.StatusCode.UNAVAILABLE]
        self.client(reps, token="s3cret").compute_gradients(chain_request(batch=4)[0])
        self.assertEqual(len(log), 3)
        for _, _, metadata in log:
            self.assertEqual(metadata, (("authorization", "Bearer s3cret"),))


class RefusalTest(unittest.TestCase):
    def refuses(self, request, text, **kwargs):
        log = []
        with self.assertRaises(ShardedError) as raised:
            ShardedClient(replicas(2, log)).compute_gradients(request, **kwargs)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(text, raised.exception.details())
        self.assertEqual(log, [], "nothing may be sent")

    def test_per_row_results(self):
        for field in ("return_output", "return_input_gradient"):
            request, _ = chain_request()
            setattr(request.options, field, True)
            self.refuses(request, "per-row results")
        request = pb.ComputeGradientsRequest()
        request.model.graph.loss_target = "y"
        request.options.input_gradient_names.append("x")
        self.refuses(request, "per-row results")

    def test_batches_that_cannot_be_split(self):
        request, _ = chain_request(batch=4)
        request.targets.CopyFrom(gc.to_tensor(np.zeros((5, 1), np.float32)))
        self.refuses(request, "targets: leading size 5 differs from inputs's 4")
        request, _ = chain_request(batch=4)
        request.inputs.data = request.inputs.data[:-1]
        self.refuses(request, "inputs: data size does not match")
        request, _ = chain_request(batch=4)
        request.ClearField("inputs")
        self.refuses(request, "inputs: unset")
        self.refuses(chain_request()[0], "shards must be >= 1", shards=0)


if __name__ == "__main__":
    unittest.main()
