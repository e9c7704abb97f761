"""Validation perplexity, last-word accuracy, sample generations and the evaluation report."""
