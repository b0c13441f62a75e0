"""The user-facing side: the `modelfs` command line and the FUSE mount (name tree, operations,
lifecycle). Never speaks HTTP itself: it drives modelfs.fetcher and modelfs.cache."""
