"""absl entry points: train, convert, bench."""
