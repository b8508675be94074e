"""fnl.qat."""
