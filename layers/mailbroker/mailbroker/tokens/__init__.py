"""OAuth2 access tokens: one cache entry per credential identity, three levels (memory of the
execution environment, DynamoDB, the provider), refresh ahead of expiry, and a single refresh per
lifetime across every Lambda environment."""
