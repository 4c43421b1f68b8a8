//! Examples and end-to-end tests of the iothub-jobs workspace live in `examples/` and `tests/`.
