"""fnl.hooks."""
