"""Small shared helpers: atomic file output, logging setup, module train/eval state."""
