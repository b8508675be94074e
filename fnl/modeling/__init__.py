"""fnl.modeling."""
