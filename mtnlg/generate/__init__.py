"""Text generation with a key/value cache: greedy, temperature, top-k, top-p; chat mode."""
