"""Seed-set importers, one module per dataset layout. Each lists its dataset as Records (pipeline/importers/records.py)
without opening an image; the seed stage (pipeline/seed.py) splits, subsets and loads them."""
