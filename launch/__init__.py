"""Entry points: each module parses its command line and calls the library (console scripts in setup.py)."""
