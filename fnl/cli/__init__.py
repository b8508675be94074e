"""fnl.cli: the command-line entry points, thin wrappers over the layers below.

A command imports the pipeline inside its functions, when it runs: ``--help`` and argument errors then answer in
about 0.1 s of CPU instead of the 4 s that importing torch costs (tests/test_layering.py allows these imports here
only)."""
