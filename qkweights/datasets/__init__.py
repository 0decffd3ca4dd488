"""Image datasets read as found in the wild: O3 (and a synthetic O3), ADE20K and instance maps."""
