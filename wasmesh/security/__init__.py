"""Mesh identity: the built-in CA, SPIFFE workload identities, bootstrap tokens and xDS mTLS."""
