"""The user-facing side: the `modelfs` command line (and, later, the FUSE mount).
Never speaks HTTP itself: it drives modelfs.fetcher and modelfs.cache."""
