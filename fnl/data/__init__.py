"""fnl.data."""
