"""Small shared helpers: atomic file output, logging setup."""
