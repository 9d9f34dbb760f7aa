"""dextra: data extrapolation for text-to-image training.

The code lives in the top-level folders pipeline/, crawl/, filter/ and train/, installed as
dextra.pipeline, dextra.crawl, dextra.filter and dextra.train (see pyproject.toml).
"""
