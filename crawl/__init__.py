"""Getting web images: URL lists and the img2dataset fetch."""
