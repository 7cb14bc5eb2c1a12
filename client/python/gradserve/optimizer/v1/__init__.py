"""gradserve.optimizer.v1 protobuf and gRPC stubs, generated at build time (build_backend/)."""
