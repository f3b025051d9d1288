"""Training: state, optimizer, pure steps, objectives and the host loop."""
