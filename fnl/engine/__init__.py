"""fnl.engine."""
