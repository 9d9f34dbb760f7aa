"""One thin module per DVC stage: read params and inputs, call the libraries (crawl, filter, train), write outputs."""
