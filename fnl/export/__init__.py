"""fnl.export."""
