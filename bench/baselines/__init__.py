"""Re-creations of how MGM is served today (the official HF transformers path), for side-by-side benchmarks."""
