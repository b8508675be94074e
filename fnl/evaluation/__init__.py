"""fnl.evaluation."""
