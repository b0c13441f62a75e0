"""Local storage: the Ollama-compatible store layout, sparse partial blobs, the chunk index,
verification and sealing. Imports nothing from modelfs.fetcher or modelfs.fs."""
