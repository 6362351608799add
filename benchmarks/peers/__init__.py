"""Peers measured beside nbdist, each in a subprocess that sees the peers' own install."""
