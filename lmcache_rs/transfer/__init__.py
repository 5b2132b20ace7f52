"""Moving KV bytes with torch: mapping worker tensors and paged gather/scatter."""
