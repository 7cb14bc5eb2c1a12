"""gradserve.optimizer: the training service's API (stubs generated at build time)."""
