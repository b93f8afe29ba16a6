"""What a trained model has learned about genes: gene networks from attention, gene importance,
in-silico perturbation."""
