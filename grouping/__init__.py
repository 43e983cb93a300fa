"""Templates, grouping decisions and kinds: payload in, decision out."""
