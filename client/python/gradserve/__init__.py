"""gradserve Python client: generated gradserve.v1 stubs (run generate.sh) and helpers."""
