"""gradserve: neural-network gradients as a gRPC service — the Python client.

    import gradserve

    channel = gradserve.connect("127.0.0.1:50051")      # message limits, retries, TLS, token
    stub = gradserve.stub(channel)
    request = gradserve.pb.ComputeGradientsRequest(...)  # or request_from_sequential(net, ...)
    response = stub.ComputeGradients(request, timeout=30)
    grads = gradserve.state_dict_gradients(request.model, response)   # {"0.weight": array, ...}

Modules: ``gradserve.client`` (everything re-exported here: numpy <-> tensors, ``connect``,
``health``, state_dict <-> parameters, ``TrainingStream``), ``gradserve.graph`` (graph models by
hand, or traced from a torch.nn module), ``gradserve.onnx`` (ONNX files and torch exports),
``gradserve.sharded`` (a batch split across replicas, combined exactly). The protobuf and gRPC
stubs: ``gradserve.pb`` / ``gradserve.pb_grpc`` (package ``gradserve.v1``) and
``gradserve.optimizer.v1`` (the training service). torch is needed only where a function says so.
"""

from gradserve.client import *  # noqa: F401,F403  (the helpers' __all__ is the package's API)
from gradserve.client import __all__ as _client_all
from gradserve import graph, onnx, sharded  # noqa: E402
from gradserve.graph import GraphBuilder, GraphModel, UnsupportedError, from_module
from gradserve.sharded import ShardedCallStats, ShardedClient, ShardedError

__version__ = "0.1.0"  # Keep equal to pyproject.toml's (a test checks).

__all__ = [*_client_all, "graph", "onnx", "sharded", "GraphBuilder", "GraphModel",
           "UnsupportedError", "from_module", "ShardedClient", "ShardedCallStats",
           "ShardedError", "__version__"]
