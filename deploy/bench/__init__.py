"""`moe-serve bench`: load generators, the transformers baseline, plots and reports."""
