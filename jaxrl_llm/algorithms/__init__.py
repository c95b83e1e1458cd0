"""Training algorithms; pure loss functions live in `losses`."""
