"""The counter-sync bench: counter-sync and its peers, measured side by side.

Run `python -m bench --help`; bench/README.md explains each measurement.
"""
