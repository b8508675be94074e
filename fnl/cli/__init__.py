"""fnl.cli."""
