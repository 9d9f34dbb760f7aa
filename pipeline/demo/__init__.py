"""The embedded demo (docs/architecture.md, "The demo"): coloured digits as the seed set, and a synthetic web of
file:// URLs for the later stages to crawl, both generated from params alone so the pipeline runs offline.

Every random draw comes from a numpy Generator seeded by (params.seed, purpose, index), so the same params give
byte-identical files on one machine. Across machines the JPEG encoder and the fonts found may differ.
"""
