"""Thin Ray entry points over the ``codebook`` library."""
